"""Transformer models: FlexTok's flow decoder and the generators.

`diffusion.flow` states the time convention (t = 0 data, t = 1 noise); `diffusion.blocks`
holds the shared transformer blocks; `diffusion.generator.LatentDiT` is the latent
(LightningDiT-style) generator and `diffusion.ar.ClassConditionalAR` the autoregressive one
over token indices; `diffusion.samplers` holds a trained generator for sampling
(what evaluation loads, what training subclasses). Runs from the repository root; never installed."""
