"""The ``quantkit`` command: a thin click layer over plain Python functions.

Every command parses its options, calls one importable function, and prints its result (a table, or JSON
with ``--json``). User mistakes surface as :class:`~quantkit.errors.QuantkitError`: one line on stderr,
non-zero exit, no traceback. Heavy libraries (torch, transformers, llama_cpp) are imported inside the
functions, so ``quantkit --help`` stays fast.
"""

from __future__ import annotations

import json
import sys

import click

from quantkit import __version__
from quantkit.errors import QuantkitError


def emit_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="quantkit")
def cli():
    """Quantise open-weights LLMs (GGUF, AWQ, GPTQ), measure them, write cards and publish to the Hub."""


# ---------------------------------------------------------------------------------------------- pull
@cli.command()
@click.argument("model")
@click.option("--revision", help="Branch, tag or commit SHA (Hub ids only). Resolved to a commit SHA.")
@click.option("--allow-pickle", is_flag=True, help="Accept pickle .bin weights when a repo has no safetensors.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def pull(model, revision, allow_pickle, as_json):
    """Download MODEL (Hub id org/name, or check a local folder) without converting it."""
    from quantkit.hub import pull as do_pull

    src = do_pull(model, revision, allow_pickle=allow_pickle)
    if as_json:
        emit_json(src.to_json())
    else:
        click.echo(f"{src.id or src.path} @ {src.sha}\n  path: {src.path}\n  licence: {src.license or 'unknown'}")


# ---------------------------------------------------------------------------------------------- gguf
@cli.command()
@click.argument("model")
@click.option("--types", "types", required=True,
              help="Comma-separated llama.cpp types, e.g. Q4_K_M,Q5_K_M,Q8_0 (IQ types need --calibration).")
@click.option("--out", type=click.Path(file_okay=False), help="Output folder (default ./<ModelName>-GGUF).")
@click.option("--revision", help="Branch, tag or commit SHA (Hub ids only). Resolved to a commit SHA.")
@click.option("--calibration", help="Text for an importance matrix used by every type: a .txt/.jsonl file, "
                                    "'builtin', or hub:org/name:split:column.")
@click.option("--allow-pickle", is_flag=True, help="Accept pickle .bin weights when a repo has no safetensors.")
@click.option("--outtype", type=click.Choice(["f16", "bf16", "f32", "auto"]), default="auto", show_default=True,
              help="Type of the intermediate GGUF converted once from the HF weights.")
@click.option("--threads", type=int, help="Threads for quantising (default: all cores).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def gguf(model, types, out, revision, calibration, allow_pickle, outtype, threads, as_json):
    """Convert MODEL (Hub id or local folder) once to GGUF, then quantise it to every --types."""
    from quantkit.gguf import quantize_gguf

    res = quantize_gguf(model, types.split(","), out, revision=revision, calibration=calibration,
                        allow_pickle=allow_pickle, outtype=outtype, threads=threads)
    if as_json:
        emit_json(res.to_json())
    else:
        click.echo(res.table())
        extra = f"; imatrix: {res.imatrix.name}" if res.imatrix else ""
        click.echo(f"\n{res.folder} (manifest {res.manifest.path.name}{extra}; "
                   f"{'converted' if res.converted else 'no conversion needed'})")


# [gguf commands] (insert above this line)


# [awq/gptq commands] (insert above this line)


# [eval/bench commands] (insert above this line)


# [card/push commands] (insert above this line)


# [recipe/plan/run commands] (insert above this line)


# --------------------------------------------------------------------------------------------- setup
@cli.command()
def setup():
    """Fetch llama.cpp's HF->GGUF converter matching the installed llama-cpp-python (done once, cached)."""
    from quantkit import llamacpp

    path = llamacpp.ensure_sources()
    tools = llamacpp.tools_dir()
    click.echo(f"llama.cpp {llamacpp.version()} converter: {path}")
    click.echo(f"llama.cpp tools: {tools or 'not built (only benchmarks/ need them)'}")


def main(argv=None) -> None:
    """Entry point: run the group, turning user errors into one line and an exit code."""
    try:
        cli.main(args=argv, prog_name="quantkit", standalone_mode=False)
    except QuantkitError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("error: aborted; re-run the same command to resume where it stopped", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("error: interrupted; re-run the same command to resume where it stopped", err=True)
        sys.exit(130)
    except click.exceptions.NoArgsIsHelp if hasattr(click.exceptions, "NoArgsIsHelp") else ():  # pragma: no cover
        sys.exit(0)
    except click.ClickException as e:
        ctx = getattr(e, "ctx", None)
        where = ctx.command_path if ctx is not None else "quantkit"
        click.echo(f"error: {e.format_message()} (see `{where} --help`)", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)


if __name__ == "__main__":  # pragma: no cover
    main()
