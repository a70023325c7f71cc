"""``hpcckpt bench``: interleaved side-by-side measurements, reported as ratios."""
