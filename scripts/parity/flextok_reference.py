"""Build Apple's reference FlexTok (github.com/apple/ml-flextok) from a local clone, for the
parity fixtures (``flextok_fixtures.py``) and the full-size check
(``flextok_fullsize.py``). Never imported by the project itself.

The released Hugging Face directories (EPFL-VILAB/flextok_d*_d*_in1k) hold ``config.json``
(the Hydra config ``FlexTokFromHub`` instantiates: vae, encoder, decoder, regularizer,
flow_matching_noise_module, pipeline) and ``model.safetensors``. The repository ships no
config files, so ``reference_config`` writes one in that form, module by module as the
release's module names describe it (enc_*: patch embedding, 2D sin-cos, 1D registers,
prefix-causal packing, transformer, unpacking, linear head to 6 FSQ channels; dec_*:
linear from the FSQ codes, learned register positions, nested dropout, learned null
condition, noise patch embedding, 2D sin-cos, full-attention packing with adaLN
per sub-sequence, timestep embedder, adaLN transformer, unpacking, adaLN head to patches).

CPU: the reference attends with FlexAttention (compiled, CUDA); ``use_dense_attention``
switches every attention to its SDPA fallback and the packers to materialised masks
(upstream commit 87d00cc, "fall back to standard PyTorch SDPA").
"""
from __future__ import annotations

import sys
from pathlib import Path


def import_reference(ref_path: str | Path):
    """Put the clone on sys.path and return the ``flextok`` package (fails with the fix)."""
    ref_path = Path(ref_path).resolve()
    if not (ref_path / "flextok" / "flextok_wrapper.py").exists():
        raise SystemExit(f"{ref_path} is not a clone of github.com/apple/ml-flextok "
                         "(no flextok/flextok_wrapper.py). Fix: git clone https://github.com/apple/ml-flextok "
                         "and pass its path.")
    sys.path.insert(0, str(ref_path))
    import flextok  # noqa: F401  (needs einops, diffusers, mup, hydra-core, safetensors)
    import flextok.flextok_wrapper

    return flextok


def _t(target: str, **kwargs) -> dict:
    return {"_target_": target, **kwargs}


def reference_config(*, latent_channels: int = 16, image_size: int = 256, downsample: int = 8,
                     patch_size: int = 2, num_registers: int = 256, fsq_levels=(8, 8, 8, 5, 5, 5),
                     enc_dim: int = 768, enc_depth: int = 12, dec_dim: int = 768, dec_depth: int = 12,
                     head_dim: int = 64, adaln_expansion: int = 2, null_condition: str = "learned",
                     vae_hub_path: str | None = None, vae_scaling_factor: float | None = None,
                     repa_layer: int = 1) -> dict:
    """The Hydra config of a FlexTok in the release's form; sizes as arguments."""
    grid = image_size // downsample // patch_size
    P = "flextok.model."
    ch_last = {"_target_": "flextok.model.utils.dict_ops.channels_first_to_last", "_partial_": True}
    ch_first = {"_target_": "flextok.model.utils.dict_ops.channels_last_to_first", "_partial_": True}
    vae = _t("flextok.vae_wrapper.StableDiffusionVAE", images_read_key="rgb",
             vae_latents_read_key="vae_latents_reconst", vae_latents_write_key="vae_latents",
             images_reconst_write_key="rgb_reconst", vae_kl_loss_write_key="vae_kl_loss",
             latent_channels=latent_channels, scaling_factor=vae_scaling_factor, hf_hub_path=vae_hub_path,
             sample_posterior=False, frozen=True)
    encoder = _t(P + "utils.wrappers.SequentialModuleDictWrapper", module_dict={
        "enc_channels_to_last": _t(P + "utils.dict_ops.PerSampleOp", read_key="vae_latents",
                                   write_key="enc_vae_latents_bhwc", per_sample_op=ch_last),
        "enc_patch_emb": _t(P + "preprocessors.patching.PatchEmbedder", input_tensor_list_read_key="enc_vae_latents_bhwc",
                            patches_list_write_key="enc_patches", n_patches_write_key="enc_n_patches",
                            channels_in=latent_channels, dim=enc_dim, patch_sizes=[patch_size, patch_size],
                            flatten_patches=False),
        "enc_posemb_module": _t(P + "utils.posembs.PositionalEmbeddingAdder", read_key="enc_patches",
                                write_key="enc_patches", dim=enc_dim, max_sizes=[grid, grid],
                                posemb_type="sincos", posemb_scaling="absolute"),
        "enc_register_module": _t(P + "preprocessors.registers.Registers1D", input_tensor_list_read_key="enc_patches",
                                  register_sizes_read_write_key="register_sizes", registers_write_key="enc_registers",
                                  dim=enc_dim, n_min=num_registers, n_max=num_registers,
                                  size_sampling_mode="uniform", ordering_mode="nested"),
        "enc_seq_packer": _t(P + "preprocessors.flex_seq_packing.BlockWiseSequencePacker",
                             input_list_read_keys=["enc_patches", "enc_registers"], packed_seq_write_key="enc_packed_seq",
                             block_mask_write_key="enc_block_mask", inner_packed_shapes_write_key="enc_ps_inner",
                             outer_packed_shapes_write_key="enc_ps_outer", mask_mode="causal_last", pad_to_multiple=128),
        "enc_transformer": _t(P + "trunks.transformers.FlexTransformer", input_seq_read_key="enc_packed_seq",
                              output_seq_write_key="enc_packed_seq", dim=enc_dim, depth=enc_depth, head_dim=head_dim,
                              block_mask_read_key="enc_block_mask"),
        "enc_unpacker": _t(P + "postprocessors.seq_unpacking.SequenceUnpacker", packed_seq_read_key="enc_packed_seq",
                           inner_seq_write_keys=["enc_patches", "enc_registers"],
                           inner_packed_shapes_read_key="enc_ps_inner", outer_packed_shapes_read_key="enc_ps_outer"),
        "enc_to_latents": _t(P + "postprocessors.heads.LinearHead", read_key="enc_registers", write_key="enc_registers",
                             dim=enc_dim, dim_out=len(fsq_levels), use_mup_readout=False, weight_init_style="zero"),
    })
    regularizer = _t("flextok.regularizers.quantize_fsq.FSQ", latents_read_key="enc_registers",
                     quants_write_key="quants", tokens_write_key="tokens", levels=list(fsq_levels))
    null = (_t(P + "preprocessors.nullcond.LearnedNullCond", read_write_key="dec_quants", dim=dec_dim, dropout_prob=0.2)
            if null_condition == "learned" else
            _t(P + "preprocessors.nullcond.ZeroNullCond", read_write_key="dec_quants", dropout_prob=0.2))
    decoder = _t(P + "utils.wrappers.SequentialModuleDictWrapper", module_dict={
        "dec_from_latents": _t(P + "preprocessors.linear.LinearLayer", read_key="quants", write_key="dec_quants",
                               dim_in=len(fsq_levels), dim=dec_dim),
        "dec_registers_posemb_module": _t(P + "utils.posembs.PositionalEmbeddingAdder", read_key="dec_quants",
                                          write_key="dec_quants", dim=dec_dim, max_sizes=[num_registers],
                                          posemb_type="learnable_sum", posemb_scaling="absolute"),
        "dec_nested_dropout": _t(P + "preprocessors.token_dropout.MaskedNestedDropout", read_write_key="dec_quants",
                                 dim=dec_dim, size_sampling_mode="uniform"),
        "dec_latent_dropout": null,
        "dec_noise_channels_to_last": _t(P + "utils.dict_ops.PerSampleOp", read_key="vae_latents_noised",
                                         write_key="dec_noise_bhwc", per_sample_op=ch_last),
        "dec_noise_patch_emb": _t(P + "preprocessors.patching.PatchEmbedder", input_tensor_list_read_key="dec_noise_bhwc",
                                  patches_list_write_key="dec_patches", n_patches_write_key="dec_n_patches",
                                  channels_in=latent_channels, dim=dec_dim, patch_sizes=[patch_size, patch_size],
                                  flatten_patches=False),
        "dec_patches_posemb_module": _t(P + "utils.posembs.PositionalEmbeddingAdder", read_key="dec_patches",
                                        write_key="dec_patches", dim=dec_dim, max_sizes=[grid, grid],
                                        posemb_type="sincos", posemb_scaling="absolute"),
        "dec_seq_packer": _t(P + "preprocessors.flex_seq_packing.BlockWiseSequencePacker",
                             input_list_read_keys=["dec_patches", "dec_quants"], packed_seq_write_key="dec_packed_seq",
                             block_mask_write_key="dec_block_mask", inner_packed_shapes_write_key="dec_ps_inner",
                             outer_packed_shapes_write_key="dec_ps_outer", mask_mode="full", pad_to_multiple=128,
                             emb_packing_fn_write_key="dec_emb_packing_fn", per_subseq_embs=adaln_expansion > 1),
        "dec_time_embedder": _t(P + "preprocessors.time_embedding.TimestepEmbedder", timesteps_read_key="timesteps",
                                time_embedding_write_key="dec_temb", dim=dec_dim, max_timestep=1.0),
        "dec_transformer": _t(P + "trunks.transformers.FlexTransformer", input_seq_read_key="dec_packed_seq",
                              output_seq_write_key="dec_packed_seq", dim=dec_dim, depth=dec_depth, head_dim=head_dim,
                              block_mask_read_key="dec_block_mask", adaLN_emb_read_key="dec_temb",
                              adaLN_packing_fn_read_key="dec_emb_packing_fn", adaLN_expansion=adaln_expansion,
                              intermediate_layer_write_key="dec_packed_seq_repa_layer", intermediate_layers=[repa_layer]),
        "dec_unpacker": _t(P + "postprocessors.seq_unpacking.SequenceUnpacker", packed_seq_read_key="dec_packed_seq",
                           inner_seq_write_keys=["dec_patches", "dec_quants"],
                           inner_packed_shapes_read_key="dec_ps_inner", outer_packed_shapes_read_key="dec_ps_outer"),
        "dec_to_patches": _t(P + "postprocessors.heads.ToPatchesLinearHead", read_key="dec_patches",
                             write_key="vae_latents_reconst_bhwc", dim=dec_dim, channels_out=latent_channels,
                             patch_sizes=[patch_size, patch_size], use_mup_readout=False, weight_init_style="zero",
                             adaLN_emb_read_key="dec_temb"),
        "dec_channels_to_first": _t(P + "utils.dict_ops.PerSampleOp", read_key="vae_latents_reconst_bhwc",
                                    write_key="vae_latents_reconst", per_sample_op=ch_first),
    })
    noise = _t("flextok.flow_matching.noise_modules.MinRFNoiseModule", clean_images_read_key="vae_latents",
               noised_images_write_key="vae_latents_noised", timesteps_write_key="timesteps", sigmas_write_key="sigmas")
    pipeline = _t("flextok.flow_matching.pipelines.MinRFPipeline", _partial_=True, latents_read_key="quants",
                  timesteps_read_key="timesteps", noised_images_read_key="vae_latents_noised",
                  reconst_write_key="vae_latents_reconst", out_channels=latent_channels)
    return {"vae": vae, "encoder": encoder, "decoder": decoder, "regularizer": regularizer,
            "flow_matching_noise_module": noise, "pipeline": pipeline}


def randomize(module, generator) -> None:
    """Every learned tensor ~ N(0, 1/fan_in) (vectors N(0, 0.1^2), positions and registers
    N(0, 0.5^2)), the zero-initialised adaLN and heads included, so every weight matters;
    the fixed sin-cos tables (requires_grad=False) stay."""
    import math

    import torch

    with torch.no_grad():
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            std = 1 / math.sqrt(p.shape[1]) if p.ndim == 2 else 0.1
            if name.endswith("posembs") or name.endswith("registers"):
                std = 0.5
            p.copy_(torch.randn(p.shape, generator=generator) * std)


def save_release_layout(model, vae, config: dict, out) -> None:
    """``model/`` (config.json + model.safetensors, as FlexTokFromHub.save_pretrained) and
    ``vae/`` (diffusers save_pretrained). Recent huggingface_hub versions write config.json
    with sorted keys, which would reorder the SequentialModuleDictWrapper modules; the
    release keeps them in the order they run, so config.json is written as the release has it."""
    import json
    from pathlib import Path

    out = Path(out)
    vae.save_pretrained(out / "vae", safe_serialization=True)
    model.save_pretrained(out / "model")
    (out / "model" / "config.json").write_text(json.dumps(config, indent=2))
    (out / "model" / "README.md").unlink(missing_ok=True)


def use_dense_attention(model) -> None:
    """Switch the reference to its SDPA fallback (CPU): dense attention, materialised masks."""
    from flextok.model.layers.attention import FlexAttention
    from flextok.model.preprocessors.flex_seq_packing import BlockWiseSequencePacker

    for module in model.modules():
        if isinstance(module, FlexAttention):
            module.use_flex_attention = False
        if isinstance(module, BlockWiseSequencePacker):
            module.return_materialized_mask = True


def reference_tokenize(model, images):
    """(B, 3, H, W) in [-1, 1] -> (B, R) int64 token ids, the reference's ``tokenize``."""
    import torch

    return torch.cat(model.tokenize(images), dim=0).long()


def reference_decode(model, tokens, noise, k: int, steps: int = 20, guidance: float = 7.5, apg: bool = True):
    """Decode the first k tokens of each row from the given initial noise (B, C, h, w) with
    the reference pipeline (its ``detokenize`` with the noise read from the data dict)."""
    import torch

    token_list = [row[None, :k] for row in tokens]
    data_dict = model._prepare_data_dict_for_detokenization(token_list)
    model.pipeline.noise_read_key = "parity_initial_noise"
    data_dict["parity_initial_noise"] = [n[None] for n in noise]
    data_dict = model.decode(data_dict, timesteps=steps, guidance_scale=guidance, perform_norm_guidance=apg,
                             vae_image_sizes=noise.shape[-1], verbose=False)
    return torch.cat(data_dict[model.image_write_key], dim=0)
