"""One sampled (or greedy) response per token-id prompt, from the unmodified policy unless asked otherwise.

On-policy distillation needs samples y ~ p_θ(·|x) from the *unmodified* policy: any temperature, top-k or
top-p changes the sampling distribution, and the advantages computed from those samples would then be for a
different distribution. Exact sampling (and greedy decoding) runs opdplus.rollout.sampler's KV-cache loop,
which has no such options at all. Only when a user asks for a modified distribution does HF `generate` run,
and then with every sampling parameter passed explicitly: it silently applies top_k=50 otherwise.
"""

import warnings
from contextlib import contextmanager

from opdplus.rollout.prompts import left_pad
from opdplus.rollout.rollouts import mask_through_first_eos
from opdplus.rollout.sampler import generate as exact_generate


@contextmanager
def eval_mode(model):
    """Temporarily switch off dropout etc. (samples must come from p_θ itself), then restore the mode."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def warn_if_off_policy(greedy: bool, temperature: float, top_k: int | None, top_p: float) -> None:
    if not greedy and (temperature != 1.0 or (top_k or 0) != 0 or top_p < 1.0):
        warnings.warn(
            f"sampling with temperature={temperature}, top_k={top_k}, top_p={top_p}: "
            "samples are then not from p_θ, so on-policy estimates are biased",
            stacklevel=3,
        )


def generate_responses(model, prompts: list[list[int]], *, max_new_tokens: int, eos_ids: list[int], pad_id: int,
                       greedy: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """One response per token-id prompt: (prompt_ids [N, P] left-padded, prompt_mask [N, P],
    response_ids [N, T] pad after the first EOS, response_mask [N, T] through the first EOS)."""
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = (t.to(device) for t in left_pad(prompts, pad_id))
    with eval_mode(model):
        if greedy or (temperature == 1.0 and not top_k and top_p >= 1.0):  # exact p_θ: our lean KV-cache loop
            output = exact_generate(model, prompt_ids, prompt_mask, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                                    pad_id=pad_id, greedy=greedy)
        else:  # the user asked for a modified distribution: HF's logits processors provide it
            output = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, max_new_tokens=max_new_tokens,
                                    pad_token_id=pad_id, eos_token_id=eos_ids, do_sample=True,
                                    temperature=temperature, top_k=top_k or 0, top_p=top_p)
    # (generate runs under no_grad itself; the mask arithmetic below needs no graph either.)
    response_ids = output[:, prompt_ids.shape[1] :]
    response_mask = mask_through_first_eos(response_ids, eos_ids)
    response_ids = response_ids.masked_fill(~response_mask, pad_id)  # generate pads finished rows; make it explicit
    return prompt_ids, prompt_mask, response_ids, response_mask
