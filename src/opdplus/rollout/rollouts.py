"""A batch of sampled responses in the one layout every engine returns and the trainer, teachers and loss read."""

from dataclasses import dataclass

import torch


@dataclass
class Rollouts:
    input_ids: torch.LongTensor  # [N, P+T] prompts left-padded to P, responses right-padded to T with pad id
    attention_mask: torch.LongTensor  # [N, P+T] 1 on real tokens: the prompt, then the response through its end
    prompt_length: int  # P
    # [N, T] the tokens the model sampled, through the first EOS: the loss mask. In a multi-turn rollout the
    # response also holds tool results (attention 1, response_mask 0): scored in context, never trained on.
    response_mask: torch.BoolTensor
    completions: list[str]  # decoded responses without special tokens (multi-turn: the last assistant turn)
    prompt_index: list[int]  # which prompt each row came from
    transcripts: list[list[dict]] | None = None  # multi-turn: each row's assistant and tool messages
    # [N, T] log-probs the rollout engine gave the tokens it sampled (0 off the response mask), when another
    # engine than the trained model sampled them (vLLM): its numerics differ from the trainer's, so the loss
    # corrects for the difference (opdplus.objective.sampler_correction). None: the trained model sampled itself.
    sampling_logprobs: torch.Tensor | None = None

    @property
    def response_ids(self) -> torch.LongTensor:
        return self.input_ids[:, self.prompt_length :]

    @classmethod
    def single_turn(cls, tokenizer, prompt_ids, prompt_mask, response_ids, response_mask, prompt_index, **extra):
        """One sampled response per row: attention over the prompt and the response through its first EOS."""
        completions = [tokenizer.decode(row[keep], skip_special_tokens=True)
                       for row, keep in zip(response_ids.cpu(), response_mask.cpu())]
        return cls(input_ids=torch.cat([prompt_ids, response_ids], dim=1),
                   attention_mask=torch.cat([prompt_mask, response_mask.long()], dim=1),
                   prompt_length=prompt_ids.shape[1], response_mask=response_mask, completions=completions,
                   prompt_index=prompt_index, **extra)


def mask_through_first_eos(response_ids: torch.Tensor, eos_ids: list[int]) -> torch.BoolTensor:
    """True up to and including the first EOS of each row (all True if a row has no EOS).

    Computed from EOS positions, never from pad ids: when pad == eos the final EOS must stay in the loss.
    """
    is_eos = torch.isin(response_ids, torch.tensor(eos_ids, device=response_ids.device))
    eos_seen_before = (torch.cumsum(is_eos.long(), dim=1) - is_eos.long()) > 0
    return ~eos_seen_before
