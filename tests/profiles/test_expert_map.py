"""The expert map on tiny random-initialised models of every supported architecture."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from profiles.errors import ModelError
from profiles.models.expert_map import build_expert_map, expert_intermediate_size, format_ranges
from tests.fixtures_models import (
    ARCHITECTURES,
    EXPERT_FFN,
    EXPERT_SHAPES,
    EXPERTS,
    HIDDEN,
    LAYERS,
    MOE_LAYERS,
    TOP_K,
    tiny_config,
    tiny_model,
)

SHARED = {"qwen2_moe", "deepseek_v2", "deepseek_v3"}


@pytest.fixture(scope="module", params=ARCHITECTURES)
def arch_model(request):
    return request.param, tiny_model(request.param)


def test_layers_experts_and_top_k(arch_model):
    arch, model = arch_model
    emap = build_expert_map(model, arch)
    assert emap.moe_layers == MOE_LAYERS[arch]
    assert emap.dense_layers == tuple(i for i in range(LAYERS) if i not in MOE_LAYERS[arch])
    assert emap.num_layers == LAYERS
    assert emap.experts_per_layer == EXPERTS and emap.top_k == TOP_K
    assert [(r.layer, r.expert) for r in emap.experts] == [
        (lay, e) for lay in MOE_LAYERS[arch] for e in range(EXPERTS)]
    assert dict(emap.expert_tensor_shapes) == EXPERT_SHAPES[arch]
    assert expert_intermediate_size(emap, HIDDEN) == EXPERT_FFN
    assert set(emap.transposed.values()) == {arch == "gpt_oss"}


def test_routers_and_shared_experts(arch_model):
    arch, model = arch_model
    emap = build_expert_map(model, arch)
    assert sorted(emap.routers) == list(MOE_LAYERS[arch])
    for router in emap.routers.values():
        assert tuple(router.weight.shape) == (EXPERTS, HIDDEN)
    if arch in SHARED:
        assert sorted(emap.shared_experts) == list(MOE_LAYERS[arch])
        names = set(emap.shared_experts[MOE_LAYERS[arch][0]])
        assert any("down_proj" in n for n in names)
    else:
        assert emap.shared_experts == {}
    # shared experts and routers are not routed experts
    routed = {t.data_ptr() for r in emap.experts for t in r.tensors.values()}
    for tensors in emap.shared_experts.values():
        assert not routed & {t.data_ptr() for t in tensors.values()}


def test_expert_tensors_are_views_that_write_through(arch_model):
    arch, model = arch_model
    emap = build_expert_map(model, arch)
    layer = MOE_LAYERS[arch][-1]
    ref = emap.get(layer, 2)
    fused = emap.expert_modules[layer]
    for name, t in ref.tensors.items():
        param = getattr(fused, name)
        assert t.untyped_storage().data_ptr() == param.untyped_storage().data_ptr()
        assert t.data_ptr() == param[2].data_ptr()  # expert 2's slice, no copy
    ids = torch.arange(3, 19).reshape(1, 16)
    with torch.no_grad():
        before = model(ids).logits.clone()
        saved = {n: t.clone() for n, t in ref.tensors.items()}
        for t in ref.tensors.values():
            t.mul_(5.0)
        assert torch.equal(fused.down_proj[2], ref.tensors["down_proj"])
        changed = model(ids).logits
        for n, t in ref.tensors.items():
            t.copy_(saved[n])
        after = model(ids).logits
    assert not torch.equal(before, changed)  # the model computes with the edited expert
    assert torch.equal(before, after)


def test_meta_model_maps_without_memory():
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config("olmoe"))
    emap = build_expert_map(model)
    assert emap.experts[0].tensors["gate_up_proj"].is_meta
    assert len(emap.experts) == LAYERS * EXPERTS


class _MLP(nn.Module):
    def __init__(self, h: int, i: int):
        super().__init__()
        self.w1, self.w3 = nn.Linear(h, i, bias=False), nn.Linear(h, i, bias=False)
        self.w2 = nn.Linear(i, h, bias=False)


def test_modulelist_layout_maps_each_expert_module():
    """Older and remote-code checkpoints keep one module per expert (Mixtral's w1/w2/w3)."""
    model = tiny_model("mixtral")
    for layer in model.model.layers:
        layer.mlp.experts = nn.ModuleList(_MLP(HIDDEN, EXPERT_FFN) for _ in range(EXPERTS))
    emap = build_expert_map(model)
    assert emap.moe_layers == (0, 1, 2) and emap.experts_per_layer == EXPERTS
    assert dict(emap.expert_tensor_shapes) == {"w1.weight": (EXPERT_FFN, HIDDEN),
                                               "w3.weight": (EXPERT_FFN, HIDDEN),
                                               "w2.weight": (HIDDEN, EXPERT_FFN)}
    ref = emap.get(1, 3)
    w2 = model.model.layers[1].mlp.experts[3].w2.weight
    assert ref.tensors["w2.weight"].data_ptr() == w2.data_ptr()
    assert expert_intermediate_size(emap, HIDDEN) == EXPERT_FFN
    assert not any(emap.transposed.values())


def test_dense_model_is_refused():
    with pytest.raises(ModelError, match="no routed-expert layers.*llama"):
        build_expert_map(tiny_model("llama"), "tiny-llama")


def test_missing_expert_is_a_clear_error():
    emap = build_expert_map(tiny_model("deepseek_v3"))
    with pytest.raises(ModelError, match=r"MoE layers are 1-2, experts 0-3"):
        emap.get(0, 0)
    with pytest.raises(ModelError, match="expert 4 does not exist"):
        emap.get(1, 4)


def test_format_ranges():
    assert format_ranges([3, 1, 2, 5, 7, 8]) == "1-3, 5, 7-8"
    assert format_ranges([]) == ""
