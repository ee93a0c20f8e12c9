"""VP SDE experiments (DDPM's noise schedule as an SDE), with the DDPM models of Ho et al. (2020) in ddpm/."""
