"""NCSN (Song & Ermon 2019) on CIFAR-10 and CelebA, and its ablations by the techniques of Song & Ermon (2020):
1 initial noise scale σ_max, 2 the number of noise scales, 4 Langevin step size and steps per scale, 5 EMA. The file
suffix lists the techniques applied (cifar10.py: the original NCSN; cifar10_1245.py: all but technique 3)."""
