"""Small shared helpers: atomic file I/O, image files and grids, devices, code tensor checks."""
