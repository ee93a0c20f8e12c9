"""VE SDE experiments (SMLD: σ(t) = σ_min (σ_max/σ_min)^t), with the NCSN models in ncsn/ and ncsnv2/."""
