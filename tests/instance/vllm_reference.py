"""Offline reference: greedy outputs of vLLM's own ``LLM.generate``.

Run as a script (vLLM spawns its engine process, so the engine must start under
``__main__``): ``python vllm_reference.py MODEL INPUTS.json OUT.json``. Each input
is ``{"messages": [...]}`` (rendered with the model's chat template) or
``{"prompt_token_ids": [...]}``; each output is the list of generated token ids.
"""

from __future__ import annotations

import json
import sys


def main(model: str, inputs_path: str, out_path: str, max_tokens: int) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=1024,
              kv_cache_memory_bytes=16 * 1024 * 1024, block_size=32, seed=0)  # fmt: skip
    tok = llm.get_tokenizer()
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outputs = []
    with open(inputs_path) as f:
        inputs = json.load(f)
    for item in inputs:
        if "messages" in item:
            text = tok.apply_chat_template(item["messages"], tokenize=False,
                                           add_generation_prompt=True)  # fmt: skip
            ids = tok.encode(text, add_special_tokens=False)
        else:
            ids = item["prompt_token_ids"]
        result = llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)
        outputs.append({"prompt_token_ids": ids, "token_ids": list(result[0].outputs[0].token_ids)})
    with open(out_path, "w") as f:
        json.dump(outputs, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
