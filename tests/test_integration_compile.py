"""A patched decoder's decode step under ``torch.compile(fullgraph=True)`` with a static cache: the shape of a
step that CUDA graphs capture (``mode="reduce-overhead"`` on a GPU). One graph serves every step (no graph break,
no recompilation as the position advances), and the compiled steps give the eager steps' logits."""

from __future__ import annotations

import pytest
import torch

from .hf_models import decoder_model, patch_with_random_bank

transformers = pytest.importorskip("transformers")

STEPS, BATCH, PROMPT = 20, 2, 8


def _decode(model, prompt, tasks, step_fn_of):
    """The logits of STEPS greedy decode steps after the prompt, each step through ``step_fn_of(step)``."""
    from ptv2_kernels.integrations.hf_transformers import cache_keyword

    keyword = cache_keyword()
    cache = transformers.StaticCache(config=model.config, max_cache_len=64)
    extra = {} if tasks is None else {"task_ids": tasks}

    def step(ids, position):
        return model(input_ids=ids, **{keyword: cache}, use_cache=True, cache_position=position, **extra).logits

    run = step_fn_of(step)
    logits = []
    with torch.no_grad():
        out = model(input_ids=prompt, **{keyword: cache}, use_cache=True, cache_position=torch.arange(PROMPT),
                    **extra)
        next_ids = out.logits[:, -1:].argmax(-1)
        for i in range(STEPS):
            step_logits = run(next_ids, torch.tensor([PROMPT + i]))
            logits.append(step_logits)
            next_ids = step_logits[:, -1:].argmax(-1)
    return torch.stack(logits)


@pytest.mark.parametrize("prefix_len", [[4], [4, 3]], ids=["one-task", "two-tasks"])
def test_static_cache_decode_compiles_to_one_graph(prefix_len):
    import torch._dynamo
    from torch._dynamo.utils import counters

    model = decoder_model("llama")
    patch_with_random_bank(model, prefix_len, 0.5, backend="auto")
    prompt = torch.randint(3, 50, (BATCH, PROMPT), generator=torch.Generator().manual_seed(0))
    tasks = torch.tensor([1, 0]) if len(prefix_len) > 1 else None

    torch._dynamo.reset()
    counters.clear()
    compiled = _decode(model, prompt, tasks,
                       lambda step: torch.compile(step, fullgraph=True, backend="eager", dynamic=False))
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["recompiles"], dict(counters["recompiles"])
    eager = _decode(model, prompt, tasks, lambda step: step)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)  # the same ops in the same order
    torch._dynamo.reset()
