"""Datasets for nanoQwen3-VL. `data.toyworld` is the procedural world the README's main run trains on."""
