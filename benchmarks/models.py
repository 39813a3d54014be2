"""Model-level workloads: a P-Tuning v2 training step and decode steps, patched model vs PEFT prefix tuning.

Models are built from configs with random weights (no downloads): a BERT-large-config sequence classifier and a
Llama-style ~1B-config causal LM (small configs of both in the CPU run). Providers:

* ``ptv2-triton`` / ``ptv2-cuda`` / ``ptv2-native`` / ``ptv2-auto`` — the model patched with
  :func:`ptv2_kernels.patch` and a :class:`ptv2_kernels.PrefixBank` (``positions="shifted"``, as PEFT places the
  real tokens), that backend for every attention (``auto``: what a user who names none gets),
  :func:`ptv2_kernels.freeze_backbone` (the prefix and the head train);
* ``peft-path`` — ``peft.get_peft_model(model, PrefixTuningConfig(task_type=..., num_virtual_tokens=P))`` on the
  same model with transformers' SDPA attention;
* ``unpatched`` — decode steps of the same model without any prefix (transformers' SDPA attention): the host-path
  baseline of target P7, checked against itself in the oracle's dtype (it computes something else than the others);
* ``ptv2-packed`` / ``ptv2-padded`` — the ``packed-vs-padded`` workload (target P9): a training step of the patched
  BERT token classifier (``backend="auto"``) on the workload's skewed sequences (``workloads.sequence_lengths``)
  packed into one row (``input_ids [1, total]``, ``position_ids`` restarting at 0 for each sequence, no attention
  mask, one task id per sequence: what transformers' ``DataCollatorWithFlattening`` gives), or padded to the
  longest (``input_ids [B, longest]`` with an attention mask, one task id per sample). Both count the real tokens.

A training step is forward, loss, backward and an AdamW step (bf16 autocast over float32 weights on a GPU); it is
reported as tokens/s (B·N per step; the real tokens of a packed workload) and peak memory. A decode step is one new token per sample over a cache of
the prompt: the patched model's cache holds the N prompt tokens, PEFT's holds B copies of the prefix too; the
cache is reset to the prompt before each round.

The pre-timing check runs in eval mode (no dropout) and compares logits and the prefix gradient (training) or the
next-token logits (decode) with an oracle: the model patched with the reference backend, in float64 on the CPU or
float32 on a GPU. PEFT is checked the same way against a second copy of the model patched with its own prefix
imported by :meth:`ptv2_kernels.PrefixBank.from_peft` — so PEFT and the patched model are shown to compute the
same thing before they are compared.
"""

from __future__ import annotations

import contextlib
import importlib.util
from typing import Optional

from . import env  # first: sets TRITON_INTERPRET before anything imports triton

import torch  # noqa: E402

from . import check  # noqa: E402
from .harness import Case, Unavailable  # noqa: E402
from .workloads import MODEL_KINDS, Workload  # noqa: E402

PROVIDERS = ("ptv2-triton", "ptv2-cuda", "ptv2-native", "ptv2-auto", "peft-path", "unpatched", "ptv2-packed",
             "ptv2-padded")
# The providers of the packed-vs-padded workload (and only of it): the batch form each one trains on.
BATCH_FORMS = {"ptv2-packed": "packed", "ptv2-padded": "padded"}
LEARNING_RATE = 5e-3  # P-Tuning v2's range is 5e-3..6e-2; the value does not change the work


def integration_missing() -> Optional[str]:
    """None when ``ptv2_kernels.patch`` and ``PrefixBank`` are importable, else why the patched model cannot run."""
    try:
        import ptv2_kernels
    except ImportError as error:  # pragma: no cover
        return f"ptv2_kernels does not import: {error}"
    missing = [name for name in ("patch", "unpatch", "PrefixBank", "freeze_backbone") if not hasattr(ptv2_kernels,
                                                                                                      name)]
    if missing:
        return f"integration not available yet (ptv2_kernels has no {', '.join(missing)})"
    return None


def _library_missing() -> Optional[str]:
    for package in ("transformers", "peft"):
        if importlib.util.find_spec(package) is None:
            return f"the {package} package is not installed"
    return None


# ----------------------------------------------------------------------------------------------------------------
# Models from configs
# ----------------------------------------------------------------------------------------------------------------

CONFIGS = {
    ("bert", "large"): dict(vocab_size=30522, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                            intermediate_size=4096, max_position_embeddings=512),
    ("bert", "tiny"): dict(vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=64),
    ("llama", "1b"): dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                          num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096),
    ("llama", "tiny"): dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128),
}


def build_model(w: Workload, seed: int = 0):
    """The workload's model with random weights (the same for the same seed), on the device, SDPA attention."""
    import transformers

    settings = CONFIGS[(w.model, w.size)]
    torch.manual_seed(seed)
    if w.model == "bert":
        config = transformers.BertConfig(**settings, num_labels=2, attn_implementation="sdpa")
        # A packed row holds many sequences: a per-token head (a sequence head would pool the row's first token).
        head = transformers.BertForTokenClassification if w.packed else transformers.BertForSequenceClassification
        model = head(config)
    else:
        config = transformers.LlamaConfig(**settings, attn_implementation="sdpa")
        model = transformers.LlamaForCausalLM(config)
    model = model.to(env.DEVICE)
    if w.kind == "generate" and env.ON_GPU:
        model = model.to(w.torch_dtype)  # inference weights in the run's dtype; training keeps float32 + autocast
    return model


def _task_type(w: Workload) -> str:
    return "SEQ_CLS" if w.model == "bert" else "CAUSAL_LM"


def make_batches(w: Workload, count: int, seed: int = 0) -> list[dict]:
    """Random token batches: key padding (lengths in [N/2, N]) for BERT, labels for the loss."""
    vocab = CONFIGS[(w.model, w.size)]["vocab_size"]
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(1, vocab, (w.batch, w.seq_len), generator=gen)
        mask = torch.ones(w.batch, w.seq_len, dtype=torch.long)
        if w.padding:
            lengths = torch.randint(max(1, w.seq_len // 2), w.seq_len + 1, (w.batch,), generator=gen)
            lengths[0] = w.seq_len
            mask = (torch.arange(w.seq_len)[None, :] < lengths[:, None]).long()
        labels = torch.randint(0, 2, (w.batch,), generator=gen) if w.model == "bert" else ids.clone()
        batches.append({"input_ids": ids.to(env.DEVICE), "attention_mask": mask.to(env.DEVICE),
                        "labels": labels.to(env.DEVICE)})
    return batches


def make_packed_batches(w: Workload, count: int, seed: int = 0) -> list[dict]:
    """Per batch the same random sequences of ``workloads.sequence_lengths(w)`` (with a random label per token)
    in both forms: ``{"packed": ..., "padded": ...}`` (see the module docstring), one task id per sequence."""
    from .workloads import sequence_lengths

    vocab = CONFIGS[(w.model, w.size)]["vocab_size"]
    lengths = sequence_lengths(w)
    longest, total = max(lengths), sum(lengths)
    gen = torch.Generator().manual_seed(seed)
    task_ids = torch.arange(len(lengths)) % w.num_tasks
    mask = (torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None])
    pairs = []
    for _ in range(count):
        ids = torch.randint(1, vocab, (total,), generator=gen)
        labels = torch.randint(0, 2, (total,), generator=gen)
        padded_ids = torch.zeros(len(lengths), longest, dtype=torch.long)
        padded_labels = torch.full((len(lengths), longest), -100)
        padded_ids[mask], padded_labels[mask] = ids, labels
        positions = torch.cat([torch.arange(n) for n in lengths])
        packed = {"input_ids": ids[None], "position_ids": positions[None], "labels": labels[None],
                  "task_ids": task_ids}
        padded = {"input_ids": padded_ids, "attention_mask": mask.long(), "labels": padded_labels,
                  "task_ids": task_ids}
        pairs.append({form: {k: v.to(env.DEVICE) for k, v in batch.items()}
                      for form, batch in (("packed", packed), ("padded", padded))})
    return pairs


def real_token_logits(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """``[total, C]``: the real tokens' logits of a padded ``[B, N, C]`` (by its attention mask) or packed
    ``[1, total, C]`` batch, in the packed order — the same rows for both forms of one batch."""
    mask = batch.get("attention_mask")
    return logits[0] if mask is None else logits[mask.bool()]


def _autocast(w: Workload):
    if env.ON_GPU and w.kind == "train" and w.torch_dtype != torch.float32:
        return torch.autocast("cuda", dtype=w.torch_dtype)
    return contextlib.nullcontext()


def _oracle_dtype() -> torch.dtype:
    return torch.float32 if env.ON_GPU else torch.float64


@contextlib.contextmanager
def _as_dtype(model, dtype: torch.dtype):
    """The model (and its bank) converted to ``dtype`` for the oracle, converted back afterwards (exact: the
    oracle's dtype holds every value of the run's)."""
    before = next(iter(model.parameters())).dtype
    model.to(dtype)
    try:
        yield model
    finally:
        model.to(before)


# ----------------------------------------------------------------------------------------------------------------
# Patched model and PEFT model
# ----------------------------------------------------------------------------------------------------------------

def _patched(w: Workload, backend: str, model=None, bank=None):
    """(model, bank): the model patched with a fresh bank of the workload's tasks (or ``bank``) and ``backend``."""
    import ptv2_kernels

    model = build_model(w) if model is None else model
    if bank is None:
        bank = ptv2_kernels.PrefixBank.for_model(model, num_tasks=w.num_tasks, prefix_len=w.prefix_len)
        torch.manual_seed(1)
        with torch.no_grad():
            for parameter in bank.parameters():
                parameter.normal_()
        bank = bank.to(next(iter(model.parameters())).dtype)
    ptv2_kernels.patch(model, bank, positions="shifted", backend=backend)
    ptv2_kernels.freeze_backbone(model)
    return model, bank


def _repatch(model, bank, backend: str):
    import ptv2_kernels

    ptv2_kernels.unpatch(model)
    ptv2_kernels.patch(model, bank, positions="shifted", backend=backend)
    ptv2_kernels.freeze_backbone(model)


def _peft(w: Workload):
    from peft import PrefixTuningConfig, get_peft_model

    model = build_model(w)
    peft_model = get_peft_model(model, PrefixTuningConfig(task_type=_task_type(w), num_virtual_tokens=w.prefix_len))
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in _peft_prefix_parameters(peft_model):
            parameter.normal_()
    return peft_model.to(next(iter(model.parameters())).dtype)


def _peft_prefix_parameters(peft_model) -> list:
    return list(peft_model.prompt_encoder[peft_model.active_adapter].parameters())


# ----------------------------------------------------------------------------------------------------------------
# What is compared: logits and prefix gradients (train), next-token logits (decode)
# ----------------------------------------------------------------------------------------------------------------

def _train_outputs(w: Workload, model, batch, prefix_params, oracle: bool = False) -> dict:
    with contextlib.nullcontext() if oracle else _autocast(w):
        out = model(**batch)
    grads = torch.autograd.grad(out.loss, prefix_params)
    logits = real_token_logits(out.logits, batch) if w.packed else out.logits
    result = {"logits": logits.detach().float() if logits.dtype != torch.float64 else logits.detach()}
    result.update({f"prefix grad {i}": g for i, g in enumerate(grads)})
    return result


def _prefill(w: Workload, model, batch, extra_mask: int = 0):
    """Run the prompt; returns the cache and the next call's inputs (one new token per sample)."""
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=True)
    next_ids = out.logits[:, -1:].argmax(-1)
    mask = torch.ones(w.batch, extra_mask + w.seq_len + 1, dtype=torch.long, device=env.DEVICE)
    cache = getattr(out, "cache", None)  # transformers >= 5.24; before, past_key_values (deprecated since)
    if cache is None:
        cache = out.past_key_values
    return cache, {"input_ids": next_ids, "attention_mask": mask}


def _snapshot(cache):
    layers = getattr(cache, "layers", None)
    if layers is not None and all(hasattr(layer, "keys") for layer in layers):
        return [(layer.keys, layer.values) for layer in layers]
    return None


def _resetter(cache, snapshot):
    """Put the cache back to the prompt (each decode step appends to it)."""
    def reset():
        if snapshot is not None:
            for layer, (keys, values) in zip(cache.layers, snapshot):
                layer.keys, layer.values = keys, values
        else:  # caches without per-layer tensors: drop the token the step appended
            cache.crop(-1)
    return reset


def _step_logits(model, cache, inputs, reset) -> dict:
    from ptv2_kernels.integrations.hf_transformers import cache_keyword

    reset()
    with torch.no_grad():
        out = model(**inputs, **{cache_keyword(): cache}, use_cache=True)
    reset()
    return {"next-token logits": out.logits.detach().float() if out.logits.dtype != torch.float64
            else out.logits.detach()}


def _compare(got: dict, oracle: dict, same: dict, w: Workload) -> check.CheckResult:
    return check.compare(got, oracle, same, w.torch_dtype if env.ON_GPU else torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------------------------

def model_case(w: Workload, provider: str) -> Case:
    """The :class:`~benchmarks.harness.Case` of a model-level (workload, provider)."""
    if w.kind not in MODEL_KINDS:
        raise Unavailable(f"{w.name} is not a model-level workload")
    if provider not in PROVIDERS:
        raise Unavailable(f"no model-level provider {provider!r}")
    if (provider in BATCH_FORMS) != w.packed:
        raise Unavailable(f"{provider} is a provider of the packed workloads only" if provider in BATCH_FORMS else
                          f"{provider} is not compared on packed batches: the {w.group} workload compares the patched "
                          "model on the packed batch (ptv2-packed) with the same sequences padded (ptv2-padded)")
    if provider == "unpatched":
        if w.kind != "generate":
            raise Unavailable("the unpatched model is the host-path baseline of decode steps only")
        if importlib.util.find_spec("transformers") is None:
            raise Unavailable("the transformers package is not installed")
        return _unpatched_generate(w)
    reason = _library_missing() or integration_missing()
    if reason and (provider != "peft-path" or _library_missing()):
        raise Unavailable(reason)
    if reason:  # PEFT alone runs, but without the patched model it has no oracle to be checked against
        raise Unavailable(f"{reason}; the PEFT baseline is checked against the patched reference model")
    if provider in BATCH_FORMS:
        return _ptv2_train(w, "auto", BATCH_FORMS[provider])
    if provider.startswith("ptv2-"):
        from ptv2_kernels import backends

        backend = provider.split("-", 1)[1]
        why = None if backend == "auto" else backends.unavailable_reason(backend)
        if why:
            raise Unavailable(why)
        return _ptv2_train(w, backend) if w.kind == "train" else _ptv2_generate(w, backend)
    from ptv2_kernels.integrations.hf_peft import peft_prefix_tuning_problem

    problem = peft_prefix_tuning_problem()
    if problem is not None:  # a baseline that computes something else would be timed for nothing
        raise Unavailable(f"PEFT's prefix tuning does not work here: {problem}")
    return _peft_train(w) if w.kind == "train" else _peft_generate(w)


def _batch_count() -> int:
    return 2 if env.ON_GPU else 1


def _train_case(w: Workload, model, params, batches, check_fn) -> Case:
    optimizer = torch.optim.AdamW([p for p in params if p.requires_grad], lr=LEARNING_RATE)

    def step_on(batch):
        def step():
            with _autocast(w):
                loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.detach()
        return step

    def run_check():
        result = check_fn()
        model.train()
        return result

    return Case([step_on(b) for b in batches], run_check, tokens=float(w.tokens), peak_is_total=True)


def _ptv2_train(w: Workload, backend: str, form: Optional[str] = None) -> Case:
    """The patched model's training step; for a packed workload on the batches of ``form`` ("packed" or
    "padded"), checked against the padded batch on the reference backend (so a packed batch must compute what
    its sequences padded compute: each sequence attends to its own tokens and prefix only)."""
    model, bank = _patched(w, "reference")
    if form is None:
        batches = make_batches(w, _batch_count())
        reference = batches[0]
    else:
        pairs = make_packed_batches(w, _batch_count())
        batches, reference = [pair[form] for pair in pairs], pairs[0]["padded"]
    prefix_params = list(bank.parameters())

    def check_fn():
        model.eval()
        with _as_dtype(model, _oracle_dtype()):
            oracle = _train_outputs(w, model, reference, prefix_params, oracle=True)
        same = _train_outputs(w, model, reference, prefix_params)
        _repatch(model, bank, backend)
        got = _train_outputs(w, model, batches[0], prefix_params)
        return _compare(got, oracle, same, w)

    return _train_case(w, model, list(model.parameters()), batches, check_fn)


def _peft_train(w: Workload) -> Case:
    import ptv2_kernels

    peft_model = _peft(w)
    batches = make_batches(w, _batch_count())

    def check_fn():
        peft_model.eval()
        twin, bank = _patched(w, "reference", bank=ptv2_kernels.PrefixBank.from_peft(peft_model))
        twin.eval()
        try:
            with _as_dtype(twin, _oracle_dtype()):
                oracle = _train_outputs(w, twin, batches[0], list(bank.parameters()), oracle=True)
            same = _train_outputs(w, twin, batches[0], list(bank.parameters()))
        finally:
            del twin, bank
            if env.ON_GPU:
                torch.cuda.empty_cache()
        got = _train_outputs(w, peft_model, batches[0], _peft_prefix_parameters(peft_model))
        return _compare(got, oracle, same, w)

    return _train_case(w, peft_model, list(peft_model.parameters()), batches, check_fn)


def _generate_case(w: Workload, model, batch, check_fn, extra_mask: int = 0, step_model=None) -> Case:
    from ptv2_kernels.integrations.hf_transformers import cache_keyword

    model.eval()
    cache, inputs = _prefill(w, model, batch, extra_mask)
    reset = _resetter(cache, _snapshot(cache))
    runner = step_model if step_model is not None else model
    step_inputs = {**inputs, cache_keyword(): cache, "use_cache": True}

    def step():
        with torch.no_grad():
            return runner(**step_inputs).logits

    def run_check():
        return check_fn(runner, cache, inputs, reset)

    return Case([step], run_check, before=reset, tokens=float(w.batch), peak_is_total=True)


def _ptv2_generate(w: Workload, backend: str) -> Case:
    model, bank = _patched(w, backend)
    batch = make_batches(w, 1)[0]

    def check_fn(runner, cache, inputs, reset):
        got = _step_logits(runner, cache, inputs, reset)
        _repatch(model, bank, "reference")
        try:
            same = _step_logits(model, cache, inputs, reset)
            with _as_dtype(model, _oracle_dtype()):
                oracle_cache, oracle_inputs = _prefill(w, model, batch)
                oracle = _step_logits(model, oracle_cache, oracle_inputs, lambda: None)
        finally:
            _repatch(model, bank, backend)
        return _compare(got, oracle, same, w)

    return _generate_case(w, model, batch, check_fn)


def _unpatched_generate(w: Workload) -> Case:
    model = build_model(w)
    batch = make_batches(w, 1)[0]

    def check_fn(runner, cache, inputs, reset):
        got = _step_logits(runner, cache, inputs, reset)
        with _as_dtype(model, _oracle_dtype()):
            oracle_cache, oracle_inputs = _prefill(w, model, batch)
            oracle = _step_logits(model, oracle_cache, oracle_inputs, lambda: None)
        return _compare(got, oracle, got, w)

    return _generate_case(w, model, batch, check_fn)


def _peft_generate(w: Workload) -> Case:
    import ptv2_kernels

    peft_model = _peft(w)
    batch = make_batches(w, 1)[0]

    def check_fn(runner, cache, inputs, reset):
        got = _step_logits(runner, cache, inputs, reset)
        twin, _ = _patched(w, "reference", bank=ptv2_kernels.PrefixBank.from_peft(peft_model).to(
            next(iter(peft_model.parameters())).dtype))
        twin.eval()
        try:
            twin_cache, twin_inputs = _prefill(w, twin, batch)
            same = _step_logits(twin, twin_cache, twin_inputs, lambda: None)
            with _as_dtype(twin, _oracle_dtype()):
                oracle_cache, oracle_inputs = _prefill(w, twin, batch)
                oracle = _step_logits(twin, oracle_cache, oracle_inputs, lambda: None)
        finally:
            del twin
            if env.ON_GPU:
                torch.cuda.empty_cache()
        return _compare(got, oracle, same, w)

    # PEFT's generate steps call the base model with the cache PEFT's prefill built (prefix included).
    return _generate_case(w, peft_model, batch, check_fn, extra_mask=w.prefix_len,
                          step_model=peft_model.get_base_model())

