"""Speed switches (training.acceleration, fused optimizers) change how the loop runs,
not what it learns: same weights after the same steps, within float tolerance."""
import copy
from functools import partial

import pytest
import torch

from diffusion.blocks import Block
from test_module import CountingGAN, fit, tiny_vqgan
from tokenizers.losses import ReconstructionLoss
from training.acceleration import accelerate, checkpoint_blocks
from training.module import TokenizerModule


def trained_weights(seed_model, **module_kw) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)  # the same discriminator both times
    module = TokenizerModule(copy.deepcopy(seed_model), ReconstructionLoss(perceptual_weight=0),
                             CountingGAN(disc_start=1), grad_clip=1e-3, **module_kw)
    fit(module, max_steps=3)
    return {k: v.detach().contiguous() for k, v in module.tokenizer.state_dict().items()}


def test_fused_optimizer_and_channels_last_train_to_the_same_weights():
    torch.manual_seed(0)
    model = tiny_vqgan()
    plain = trained_weights(model, optimizer=partial(torch.optim.Adam, lr=1e-3, foreach=False))
    fast = trained_weights(model, optimizer=partial(torch.optim.Adam, lr=1e-3, fused=True), channels_last=True)
    moved = [k for k in plain if not torch.equal(plain[k], model.state_dict()[k])]
    assert moved  # the steps did train (grad_clip 1e-3 makes clipping active on every step)
    for k in plain:
        torch.testing.assert_close(fast[k], plain[k], rtol=1e-4, atol=1e-5, msg=k)


def test_channels_last_switch_converts_conv_weights_and_keeps_outputs():
    torch.manual_seed(0)
    model = tiny_vqgan().eval()
    x = torch.randn(2, 3, 16, 16)
    expected = model(x).reconstruction
    applied = accelerate(model, channels_last=True)
    assert applied == {"channels_last": True}
    assert model.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    out = model(x.contiguous(memory_format=torch.channels_last)).reconstruction
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_activation_checkpointing_recomputes_blocks_with_equal_gradients():
    torch.manual_seed(0)
    blocks = torch.nn.Sequential(Block(32, 4), Block(32, 4))
    checkpointed = copy.deepcopy(blocks)
    assert checkpoint_blocks(checkpointed) == 2
    x = torch.randn(2, 10, 32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y_ckpt = checkpointed(x)
    kept_ckpt, saved = sum(saved), []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = blocks(x)
    assert kept_ckpt < sum(saved) / 3  # only block inputs are kept, not every activation
    torch.testing.assert_close(y_ckpt, y)
    g_ckpt = torch.autograd.grad(y_ckpt.square().sum(), list(checkpointed.parameters()))
    g = torch.autograd.grad(y.square().sum(), list(blocks.parameters()))
    for a, b in zip(g_ckpt, g):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    ema_copy = copy.deepcopy(checkpointed)  # the EMA copy runs its own blocks, not the original's
    assert ema_copy[0].forward.block is ema_copy[0]


def test_bf16_on_a_cpu_without_bf16_units_is_flagged(monkeypatch, caplog):
    import training.acceleration as acceleration

    monkeypatch.setattr(acceleration, "cpu_has_bf16_units", lambda: False)
    assert acceleration.warn_if_bf16_is_emulated("bf16-mixed", "cpu")
    assert "trainer.precision=32-true" in caplog.text
    assert not acceleration.warn_if_bf16_is_emulated("32-true", "cpu")
    monkeypatch.setattr(acceleration, "cpu_has_bf16_units", lambda: True)
    assert not acceleration.warn_if_bf16_is_emulated("bf16-mixed", "cpu")


@pytest.mark.parametrize("bf16, channels_last", [(False, False), (True, True)])
def test_recomputed_norm_activations_keep_less_and_give_the_same_gradients(bf16, channels_last):
    from tokenizers.conv import ResBlock

    torch.manual_seed(0)
    plain = ResBlock(32, 32, norm_groups=8)
    recomputing = copy.deepcopy(plain)
    assert accelerate(recomputing, recompute_norm_act=True) == {"recomputed_norm_act_blocks": 1}
    x = torch.randn(2, 32, 8, 8)
    if channels_last:
        for block in (plain, recomputing):
            block.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()

    def run(block):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = block(x)
        y.float().square().sum().backward()
        grads = [x.grad.clone()] + [p.grad.clone() for p in block.parameters()]
        x.grad = None
        return y, grads, sum(n for n in saved if n >= x.numel())  # full-size activations only

    y, grads, kept = run(plain)
    y_re, grads_re, kept_re = run(recomputing)
    # each norm-act-conv keeps its input only: neither the GroupNorm output (SiLU's input)
    # nor the SiLU output (the convolution's input) is stored, in both convs of the block
    assert kept - kept_re >= 4 * x.numel()
    torch.testing.assert_close(y_re, y, rtol=0, atol=0)
    for g_re, g in zip(grads_re, grads):
        torch.testing.assert_close(g_re, g, rtol=1e-6, atol=1e-7)


def test_recomputed_norm_act_conv_leaves_frozen_weights_without_gradients():
    from tokenizers.conv import ResBlock

    block = ResBlock(16, 16, norm_groups=4)
    accelerate(block, recompute_norm_act=True)
    block.conv1.requires_grad_(False)
    block.norm2.requires_grad_(False)
    x = torch.randn(1, 16, 4, 4, requires_grad=True)
    block(x).sum().backward()
    assert block.conv1.weight.grad is None and block.norm2.weight.grad is None
    assert block.conv2.weight.grad is not None and block.norm1.weight.grad is not None and x.grad is not None


def test_the_module_switch_reaches_every_res_block_of_the_trained_tokenizer():
    module = TokenizerModule(tiny_vqgan(), ReconstructionLoss(perceptual_weight=0), None, recompute_norm_act=True)
    from tokenizers.conv import ResBlock

    blocks = [m for m in module.tokenizer.modules() if isinstance(m, ResBlock)]
    assert blocks and all(b.recompute_norm_act for b in blocks)
    assert not ResBlock.recompute_norm_act  # the class default stays off for other models
