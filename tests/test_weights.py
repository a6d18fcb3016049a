"""One published version = one flat buffer + an index (rayuid.sdpo.weights): layout, casts, reuse, checks."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from rayuid.sdpo.weights import (
    ALIGN,
    FlatPacker,
    checksum,
    pack_state_dict,
    plan_layout,
    unflatten,
    verify,
    write_adapter,
)


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"embed.weight": torch.randn(7, 5, generator=g), "layer.0.q.weight": torch.randn(3, 5, generator=g),
            "layer.0.norm.weight": torch.randn(5, generator=g), "positions": torch.arange(11),
            "bias": torch.randn(1, generator=g).to(torch.bfloat16)}


def test_layout_is_aligned_contiguous_and_typed():
    index = plan_layout(_state(), torch.bfloat16)
    assert [s.name for s in index] == list(_state())
    assert all(s.offset % ALIGN == 0 for s in index)
    assert all(a.offset + a.nbytes <= b.offset for a, b in zip(index, index[1:]))   # no overlap
    assert [s.dtype for s in index] == ["bfloat16", "bfloat16", "bfloat16", "int64", "bfloat16"]  # ints stay ints
    assert [s.nbytes for s in index] == [7 * 5 * 2, 3 * 5 * 2, 5 * 2, 11 * 8, 2]
    assert plan_layout(_state())[0].dtype == "float32"


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16])
def test_unflatten_returns_each_tensor_cast_once(dtype):
    state = _state()
    blob = pack_state_dict(state, version=3, dtype=dtype)
    out = unflatten(blob)
    assert list(out) == list(state) and blob.version == 3 and blob.kind == "full"
    for name, tensor in state.items():
        want = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        assert out[name].dtype == want.dtype and out[name].shape == want.shape
        assert torch.equal(out[name], want)


def test_tied_names_share_one_slot():
    shared = torch.randn(6, 4)
    state = {"embed.weight": shared, "norm": torch.ones(4), "lm_head.weight": shared}
    index = plan_layout(state, torch.bfloat16)
    assert index[2].offset == index[0].offset and index[1].offset > index[0].offset
    out = unflatten(pack_state_dict(state, 1, dtype=torch.bfloat16))
    assert torch.equal(out["lm_head.weight"], shared.to(torch.bfloat16)) and torch.equal(out["norm"], state["norm"])
    assert plan_layout({"a": shared, "b": shared.clone()})[1].offset > 0   # equal values are not the same tensor
    once = unflatten(pack_state_dict(state, 1), distinct=True)          # what the NCCL / IPC senders send
    assert list(once) == ["embed.weight", "norm"] and torch.equal(once["embed.weight"], shared)


def test_packer_reuses_its_buffer_while_the_layout_holds():
    packer = FlatPacker()
    first = packer.pack(_state(0), version=1)
    data = first.data
    second = packer.pack(_state(1), version=2)
    assert second.data is data                                   # allocated once, written again in place
    assert torch.equal(unflatten(second)["embed.weight"], _state(1)["embed.weight"])
    bigger = {**_state(1), "extra": torch.ones(4)}
    assert packer.pack(bigger, version=3).data is not data       # a new layout gets a new buffer
    assert pack_state_dict(_state(0), 1).data is not pack_state_dict(_state(0), 1).data


def test_checksum_catches_corruption_and_truncation():
    blob = pack_state_dict(_state(), version=1)
    verify(blob)
    flipped = blob.data.copy()
    flipped[ALIGN + 1] ^= 0x01
    with pytest.raises(ValueError, match="v1 are corrupt"):
        verify(type(blob)(1, "full", flipped, blob.index, blob.checksum))
    assert checksum(blob.data[:-1]) != blob.checksum
    assert checksum(blob.data) == blob.checksum == checksum(blob.data.copy())


def test_read_only_buffer_gives_views_without_copies_or_warnings():
    blob = pack_state_dict(_state(), version=1)
    frozen = blob.data.copy()
    frozen.flags.writeable = False                               # as it comes out of Ray's object store
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = unflatten(type(blob)(1, "full", frozen, blob.index, blob.checksum))
    view = out["layer.0.q.weight"]
    base = frozen.__array_interface__["data"][0]
    assert view.data_ptr() == base + blob.index[1].offset        # a view into the buffer, not a copy
    assert torch.equal(view, _state()["layer.0.q.weight"])


def test_bad_kinds_are_refused_and_lora_goes_to_disk_as_safetensors(tmp_path):
    from safetensors.torch import load_file

    with pytest.raises(ValueError, match="'full' or 'lora'"):
        pack_state_dict(_state(), 1, kind="delta")
    with pytest.raises(ValueError, match="adapter config"):
        pack_state_dict(_state(), 1, kind="lora")
    lora = {"base_model.model.q.lora_A.weight": torch.randn(2, 5), "base_model.model.q.lora_B.weight": torch.zeros(5, 2)}
    blob = pack_state_dict(lora, 4, kind="lora", lora_config={"r": 2, "target_modules": ["q"]})
    folder = write_adapter(blob, tmp_path / "adapter")
    saved = load_file(str(folder / "adapter_model.safetensors"))
    assert set(saved) == set(lora) and all(torch.equal(saved[k], lora[k]) for k in lora)
    assert (folder / "adapter_config.json").read_text() == '{"r": 2, "target_modules": ["q"]}'
    with pytest.raises(ValueError, match="needs a 'lora' blob"):
        write_adapter(pack_state_dict(lora, 4), tmp_path / "x")
    assert np.asarray(blob.data).dtype == np.uint8
