"""Media: `fetch` owns every byte that crosses the network or disk; the
per-modality modules decode bytes and do no I/O."""
