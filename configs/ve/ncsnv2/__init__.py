"""NCSNv2 (Song & Ermon 2020): all five techniques, technique 3 being the unconditional network scaled by 1/σ."""
