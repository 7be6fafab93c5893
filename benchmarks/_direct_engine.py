"""Quantise with the engine directly (no quantkit), for benchmarks/awq_gptq.py.

    python3 benchmarks/_direct_engine.py METHOD FORMAT MODEL TEXTS_JSON OUT SEQ_LEN GROUP_SIZE

Same parameters as quantkit's defaults: 4-bit; GPTQ symmetric, act-order, damp 0.01; AWQ
asymmetric. What a user would write following each engine's README.
"""

import json
import sys

method, fmt, model, texts_file, out, seq_len, group = sys.argv[1:8]
seq_len, group = int(seq_len), int(group)
texts = json.loads(open(texts_file).read())

if fmt == "classic":
    from gptqmodel import BACKEND, GPTQModel
    from gptqmodel.quantization import AWQConfig, GPTQConfig

    if method == "gptq":
        cfg = GPTQConfig(bits=4, group_size=group, desc_act=True, sym=True, damp_percent=0.01)
        kw = {}
    else:
        cfg = AWQConfig(bits=4, group_size=group, sym=False)
        kw = {"backend": BACKEND.AWQ_TORCH}
    m = GPTQModel.load(model, cfg, device="cpu")
    m.quantize(texts, batch_size=1, **kw)
    m.save(out)
else:
    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.pipelines.cache import IntermediatesCache
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not torch.accelerator.is_available():  # llm-compressor AWQ pins memory unconditionally
        IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
    tok = AutoTokenizer.from_pretrained(model)
    m = AutoModelForCausalLM.from_pretrained(model, dtype="auto")
    w = QuantizationArgs(num_bits=4, type="int", symmetric=(method == "gptq"), strategy="group", group_size=group)
    scheme = QuantizationScheme(targets=["Linear"], weights=w)
    if method == "gptq":
        from llmcompressor.modifiers.quantization import GPTQModifier

        recipe = [GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"], dampening_frac=0.01,
                               actorder="static")]
    else:
        from llmcompressor.modifiers.awq import AWQModifier

        recipe = [AWQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])]
    oneshot(model=m, tokenizer=tok, dataset=Dataset.from_dict({"text": texts}), recipe=recipe,
            max_seq_length=seq_len, num_calibration_samples=len(texts), shuffle_calibration_samples=False)
    m.save_pretrained(out, save_compressed=True)
    tok.save_pretrained(out)
