"""Pure torch math: operators, TV, CG, ADMM, denoiser and samplers. No I/O, no Ray."""
