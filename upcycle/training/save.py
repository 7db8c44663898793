"""The end of a run: the trained model (or adapter) saved for stock transformers / PEFT, an optional
MoPE -> MoE export, and an optional push to the Hub."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from upcycle.checkpoint import atomic_output_dir
from upcycle.errors import UpcycleError
from upcycle.training.config import ConfigError


def save_final(accelerator: Any, model: Any, tokenizer: Any, directory: Path, run_config: dict) -> Path:
    """Save the trained model to `directory` with ``save_pretrained`` and return it.

    The full state dict comes from ``accelerator.get_state_dict`` (it gathers FSDP/ZeRO-3 shards,
    so every process must call this) and is written by the main process through the unwrapped
    model's ``save_pretrained``: a transformers checkpoint for full/router/expert training, a PEFT
    adapter (``adapter_config.json`` + ``adapter_model.safetensors``) for LoRA and MoPE. The
    tokenizer and the run's config (``recipe.yaml``) go next to it. ``output_router_logits`` is
    switched off in the saved config: it is a training-time setting. Written to a temporary folder
    and renamed when complete.
    """
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        hf_config = getattr(unwrapped, "config", None)
        router_logits = getattr(hf_config, "output_router_logits", None)
        with atomic_output_dir(Path(directory), force=True) as temporary:
            if router_logits:
                hf_config.output_router_logits = False
            try:
                unwrapped.save_pretrained(temporary, state_dict=state_dict)
            finally:
                if router_logits:
                    hf_config.output_router_logits = True
            tokenizer.save_pretrained(temporary)
            (temporary / "recipe.yaml").write_text(yaml.safe_dump(run_config, sort_keys=False))
    accelerator.wait_for_everyone()
    return Path(directory)


def export_mope_to_moe(accelerator: Any, model: Any, tokenizer: Any, directory: Path) -> Path | None:
    """Write the block-routed MoPE model as a stock Mixtral checkpoint with `mope.export` (main
    process); return the directory there, None elsewhere.

    Raises:
        mope.MoPEExportError: the adapter has no exact Mixtral equivalent.
    """
    path = None
    if accelerator.is_main_process:
        import mope

        exported = mope.export(accelerator.unwrap_model(model), directory, force=True, tokenizer=tokenizer)
        path = Path(getattr(exported, "output", exported))
    accelerator.wait_for_everyone()
    return path


def merge_to_dense(accelerator: Any, final: Path, directory: Path, options: dict) -> Path | None:
    """Fold the saved MoE checkpoint `final` into a dense model at `directory` with `upcycle.merge`
    (main process; ``options`` are its keyword arguments, e.g. ``method``); return the directory there.

    Raises:
        UpcycleError: a bad merge option or a checkpoint merge cannot fold.
    """
    path = None
    if accelerator.is_main_process:
        from upcycle.merge import merge

        try:
            path = Path(merge(final, directory, force=True, quiet=True, **options).output)
        except TypeError as err:  # an option name upcycle.merge does not take
            raise ConfigError(f"output.merge: {err}") from None
    accelerator.wait_for_everyone()
    return path


def check_push_token(repo_id: str | None) -> None:
    """Fail before training, not after it, when ``output.push_to_hub`` is set but no token is available.

    The token lookup is the CLI's (`upcycle.hub`: HF_TOKEN, else the stored login), so a recipe and
    ``upcycle convert --push-to-hub`` accept and refuse the same setups.

    Raises:
        ConfigError: naming ``output.push_to_hub``.
    """
    if not repo_id:
        return
    from upcycle.hub import require_token  # the one token check, as the CLI's --push-to-hub

    try:
        require_token(None)
    except UpcycleError:
        raise ConfigError(
            f"output.push_to_hub: pushing to {repo_id} needs a token with write access; set HF_TOKEN or run "
            "`hf auth login`, or remove the key"
        ) from None


def push_final(accelerator: Any, directory: Path, repo_id: str, private: bool) -> str | None:
    """Upload `directory` to the Hub model repo `repo_id` from the main process; return the commit URL.

    Raises:
        UpcycleError: no token, or any Hub error (one line, no token in it).
    """
    url = None
    if accelerator.is_main_process:
        from upcycle.hub import push_folder

        url = push_folder(directory, repo_id, private=private).commit_url
    accelerator.wait_for_everyone()
    return url
