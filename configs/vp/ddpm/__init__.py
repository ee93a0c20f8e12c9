"""DDPM (Ho et al. 2020): its U-Net trained with the discrete VP objective (ancestral sampling) or continuously."""
