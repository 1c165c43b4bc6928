"""Regional torch.compile (`--compile`): compiled decoder layers compute what the eager ones compute, forward and
backward, with and without activation checkpointing; the opaque fp32 grouped-matmul operator the compiled MoE
layer calls matches torch's own grouped matmul and its autograd. (Whole training runs under --compile, with
DeepSpeed, ZeRO-3 and expert parallelism: tests/test_train_multiprocess.py.)"""

import pytest
import torch

from gpt_moe.model.config import ModelConfig
from gpt_moe.model.model import DeepSeekForCausalLM
from gpt_moe.model.moe import MoE, grouped_mm_fp32


def test_grouped_mm_fp32_operator_matches_torch_grouped_mm_and_its_gradients():
    """Values and both gradients equal `torch._grouped_mm`'s under its own autograd (an empty expert included);
    torch's operator checks (fake shapes, autograd registration) pass."""
    torch.manual_seed(0)
    x = torch.randn(12, 8, requires_grad=True)
    weight = torch.randn(3, 12, 8).transpose(1, 2).requires_grad_()  # [experts, in, out] as the experts pass it
    offsets = torch.tensor([5, 5, 12], dtype=torch.int32)
    grad = torch.randn(12, 12)
    ours = grouped_mm_fp32(x, weight, offsets)
    ours_grads = torch.autograd.grad(ours, (x, weight), grad)
    theirs = torch._grouped_mm(x, weight, offs=offsets)
    theirs_grads = torch.autograd.grad(theirs, (x, weight), grad)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    for a, b in zip(ours_grads, theirs_grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert ours_grads[1][1].abs().max() == 0  # expert 1 had no rows
    torch.library.opcheck(grouped_mm_fp32, (x, weight, offsets))


def small_moe_config() -> ModelConfig:
    """The tiny preset (a dense first layer, MoE layers with groups, a shared expert, MTP), two main layers."""
    return ModelConfig.from_preset("tiny").replace(num_hidden_layers=2, vocab_size=512)


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("checkpointing", ["full", "selective"])
def test_compiled_layers_train_like_eager_layers(checkpointing):
    """Two SGD steps of the same model eager and compiled (fp32): every loss, every parameter gradient and the
    balancing counts of each MoE layer agree: a recomputed compiled layer counts its tokens once and replays its
    routing (`full`), and a checkpointed region inside a compiled layer recomputes in the compiled backward
    (`selective`). (Without checkpointing the compiled layers are those `full` recomputes.)"""
    config = small_moe_config()
    torch.manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (2, 65))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    models = {}
    for name in ("eager", "compiled"):
        model = DeepSeekForCausalLM(config, seed=3).train()
        model.set_activation_checkpointing(checkpointing)
        if name == "compiled":
            model.compile_layers()
        models[name] = model
    torch._dynamo.reset()
    for step in range(2):
        outputs, gradients = {}, {}
        for name, model in models.items():
            out = model(inputs, labels=labels)
            out.loss.backward()
            outputs[name], gradients[name] = out, grads(model)
        eager, compiled = outputs["eager"], outputs["compiled"]
        for key in ("loss", "lm_loss", "mtp_loss", "aux_loss"):
            torch.testing.assert_close(getattr(compiled, key), getattr(eager, key), rtol=1e-5, atol=1e-6,
                                       msg=f"step {step} {key}")
        assert gradients["compiled"].keys() == gradients["eager"].keys()
        for key, value in gradients["eager"].items():
            torch.testing.assert_close(gradients["compiled"][key], value, rtol=1e-4, atol=1e-6,
                                       msg=f"step {step} {key}")
        for (_, ours), (_, theirs) in zip(models["compiled"].moe_layers(), models["eager"].moe_layers()):
            assert torch.equal(ours.load_since_update, theirs.load_since_update)
            assert isinstance(ours, MoE)
        with torch.no_grad():
            for model in models.values():
                for p in model.parameters():
                    p -= 0.5 * p.grad
                model.zero_grad(set_to_none=True)
