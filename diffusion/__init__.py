"""Rectified-flow transformer pieces: FlexTok's decoder and the latent generator.

`diffusion.flow` states the time convention (t = 0 data, t = 1 noise); `diffusion.blocks`
holds the shared transformer blocks; `diffusion.generator.LatentDiT` is the latent
generator model. Runs from the repository root; never installed."""
