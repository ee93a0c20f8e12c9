"""sub-VP SDE experiments: VP's drift with a smaller diffusion, whose variance stays below VP's (better NLL)."""
