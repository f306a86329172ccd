"""`vqar train`, `vqar presets` and `vqar config`: run configurations and training of either stage."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from vqar.commands.common import add_command, output_path, split_preset
from vqar.configs import ConfigError, preset_names, to_yaml
from vqar.parallel.runtime import launch_main

GROUPS = ("tokenizer", "ar")
RUN_KINDS = {"tokenizer": "a tokenizer run", "ar": "an AR run"}
log = logging.getLogger("vqar.train")


def _load_run_config(group: str, preset, overrides):
    if group == "tokenizer":
        from vqar.train.tokenizer import load_run_config
    else:
        from vqar.train.ar_config import load_run_config
    return load_run_config(preset, overrides)


def _say_settings_given_twice(group: str, overrides) -> None:
    """A warning for a setting the command line's overrides give twice (`steps=7 train.steps=9` trained 9 unsaid)."""
    from vqar.configs import say_settings_given_twice

    if group == "tokenizer":
        from vqar.train.tokenizer import TokenizerRunConfig as RunConfig
    else:
        from vqar.train.ar_config import ARRunConfig as RunConfig
    say_settings_given_twice(overrides, RunConfig.ALIASES)


def _check_same_model(group: str, cfg, run_dir: Path) -> None:
    if group == "tokenizer":
        from vqar.train.tokenizer import check_same_model
    else:
        from vqar.train.ar import check_same_model
    check_same_model(cfg, run_dir)


def run_train(args: argparse.Namespace) -> int:
    preset, overrides = split_preset(args.overrides)
    _say_settings_given_twice(args.group, overrides)
    run_dir = Path(args.out)
    if args.resume:
        _put_back_a_set_aside_run(run_dir, args.group)
        _check_stage(run_dir, args.group)
    preset_given = preset is not None
    if args.resume and preset is None:
        saved = run_dir / "run.yaml"
        if not saved.is_file():
            raise ConfigError(f"--resume: {saved} not found; give a preset to start a new run")
        preset = str(saved)
        if args.group == "ar":
            from vqar.train.npp import resets_of_unused_npp

            _check_same_architecture(saved, overrides)
            overrides = [*overrides, *resets_of_unused_npp(saved, overrides)]
    if preset is None:
        raise ConfigError(f"name a preset (one of: {', '.join(preset_names(args.group))}) or a YAML file")
    if args.resume and preset_given and args.group == "ar" and (run_dir / "run.yaml").is_file():
        _check_same_architecture(run_dir / "run.yaml", overrides, preset)
        overrides = [*overrides, *_the_runs_codes(run_dir, overrides)]
    cfg = _load_run_config(args.group, preset, overrides)
    if args.resume and preset_given and launch_main():
        _check_same_model(args.group, cfg, run_dir)  # the refusal of a changed model comes first, alone
        _say_changed_settings(run_dir, to_yaml(cfg), _named_settings(overrides, cfg.ALIASES))
    if args.group == "tokenizer":
        from vqar.train.tokenizer import train_tokenizer as train
    else:
        from vqar.train.ar import train_ar as train
    metrics = train(cfg, run_dir, resume=args.resume, overwrite=args.overwrite)
    if not launch_main():  # under torchrun, rank 0 reports
        return 0
    shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
    print(f"done: {run_dir} (validation: {shown})")
    picture = run_dir / ("recon_grid.png" if args.group == "tokenizer" else "samples_grid.png")
    if picture.is_file():  # none where the run draws none (`sample.n_per_class=0`)
        print(f"pictures: {picture}")
    return 0


def _put_back_a_set_aside_run(run_dir: Path, group: str) -> None:
    """--resume of a folder whose --overwrite was killed before its first checkpoint continues the run that
    --overwrite set aside (`SET_ASIDE`): it is put back before its run.yaml is read (else the killed run's settings
    trained the old run's weights on)."""
    from vqar.train.checkpoint import put_back_a_killed_overwrites_run
    from vqar.utils.io import write_lock
    from vqar.utils.runs import SET_ASIDE

    if not (run_dir / SET_ASIDE).is_dir():
        return
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun no rank may read while another moves files
        raise ConfigError(f"{run_dir} holds the run that an --overwrite killed before its first checkpoint set aside "
                          f"({SET_ASIDE}); put it back with one process first: vqar train {group} --resume --out "
                          f"{run_dir}")  # fmt: skip
    with write_lock(run_dir):
        put_back_a_killed_overwrites_run(run_dir)


def _check_stage(run_dir: Path, group: str) -> None:
    """ConfigError when the run in `run_dir` trains the other stage (`vqar train ar --resume` on a tokenizer run),
    whose run.yaml would otherwise be refused for its first key the schema does not know."""
    from vqar.utils.runs import run_kind

    stage = run_kind(run_dir)
    if stage is not None and stage != group:
        raise ConfigError(f"{run_dir} is {RUN_KINDS[stage]}, not {RUN_KINDS[group]} (resume it with `vqar train "
                          f"{stage} --resume --out {run_dir}`)")  # fmt: skip


def _say_changed_settings(run_dir: Path, run_yaml: str, named: set[str]) -> None:
    """Warns of each setting other than the `named` ones that a run resumed with a preset takes other than its
    run.yaml's: the preset states all of its own (`data.max_images`, `train.steps`), which would replace the run's
    without a word. (Those that change the model are refused before this.)"""
    import yaml

    from vqar.train.checkpoint import trained_settings

    def flat(node, prefix=""):
        if not isinstance(node, dict):
            return {prefix[:-1]: node}
        return {k: v for key, value in node.items() for k, v in flat(value, f"{prefix}{key}.").items()}

    before, now = flat(trained_settings(run_dir)), flat(yaml.safe_load(run_yaml))
    changed = [f"{key} {before[key]} -> {value}" for key, value in now.items()
               if key in before and before[key] != value and key not in named]  # fmt: skip
    if changed:
        log.warning("resuming %s with settings other than its run.yaml's: %s", run_dir, ", ".join(changed))


def _named_settings(overrides, aliases: dict[str, str]) -> set[str]:
    """The settings the command line's `key=value` overrides name, shorthands (`codes=`) spelled out."""
    return {aliases.get(key, key) for key in (item.partition("=")[0] for item in overrides)}


def _the_runs_codes(run_dir: Path, overrides) -> list[str]:
    """`data.codes=STORE` of the run resumed with a preset, unless the overrides name a store: a preset leaves it
    unset, so `vqar train ar PRESET --resume --out RUN` asked for codes= that RUN/run.yaml names."""
    from vqar.train.ar_config import ARRunConfig
    from vqar.train.checkpoint import trained_settings

    data = trained_settings(run_dir).get("data")
    codes = data.get("codes") if isinstance(data, dict) else None
    given = "data.codes" in _named_settings(overrides, ARRunConfig.ALIASES)
    return [] if given or not codes else [f"data.codes={codes}"]


def _check_same_architecture(saved: Path, overrides, preset: str | None = None) -> None:
    """ConfigError when the preset or the overrides of `--resume` change the AR run's `arch`: its checkpoints hold
    that family's weights, and its run.yaml would otherwise be refused for the first model field the new family
    lacks, as if the file were wrong (or, for a preset, the codes= the preset leaves unset would be asked for)."""
    from vqar.configs import preset_fields
    from vqar.train.ar_config import ARRunConfig

    def arch_of(source, given=()):
        return preset_fields("ar", source, given, ("arch",)).get("arch", ARRunConfig.arch)

    trained, asked = arch_of(saved), arch_of(preset or saved, overrides)
    if asked == trained:
        return
    if preset is not None and not any(item.startswith("arch=") for item in overrides):
        fitting = [name for name in preset_names("ar") if arch_of(name) == trained]
        raise ConfigError(f"--resume: the run in {saved.parent} trains arch={trained}, and preset {preset!r} is for "
                          f"arch={asked}; leave the preset out (the run's run.yaml is used) or give one for "
                          f"arch={trained} ({', '.join(fitting)})")  # fmt: skip
    raise ConfigError(f"--resume: the run in {saved.parent} trains arch={trained}, its checkpoints hold that "
                      f"model's weights; leave arch={asked} out, or start a new run in another --out")  # fmt: skip


def run_presets(args: argparse.Namespace) -> int:
    for group in [args.group] if args.group else GROUPS:
        print(f"{group}:")
        for name in preset_names(group):
            print(f"  {name}")
    return 0


def run_config(args: argparse.Namespace) -> int:
    preset, overrides = split_preset(args.overrides)
    _say_settings_given_twice(args.group, overrides)
    if args.group == "ar":
        from vqar.train.ar_config import describe_run_config

        print(describe_run_config(preset, overrides), end="")
    else:
        print(to_yaml(_load_run_config(args.group, preset, overrides)), end="")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    train = add_command(sub, "train", run_train, "train a model from a preset", "Overrides are key=value pairs on "
                        "top of the preset; shorthands for tokenizers: d=<depth> c=<codebook size> steps=<n> lr=<x> "
                        "bs=<batch size>; AR models: codes=<code store> arch=<gpt|rq|vim|var> size=<GPT-B|VAR-d16|...> "
                        "steps=<n> lr=<x> bs=<batch size>. See the full configuration with `vqar config tokenizer|ar "
                        "PRESET`.")  # fmt: skip
    train.add_argument("group", choices=GROUPS, help="what to train: a tokenizer (stage 1) or an AR model (stage 2)")
    # argparse writes a repeated list's metavar twice ("PRESET [key=value ...] [PRESET [key=value ...] ...]")
    train.usage = "vqar train [-h] --out OUT [--resume | --overwrite] {tokenizer,ar} [PRESET] [key=value ...]"
    train.add_argument("overrides", nargs="*", metavar="PRESET [key=value ...]", help="preset name or YAML file (a "
                       "--resume may leave it out: the run's own), then key=value overrides")  # fmt: skip
    train.add_argument("--out", required=True, type=output_path, help="run directory (checkpoints, metrics, "
                       "pictures, model): new, empty, or a run of this kind to --resume or --overwrite")  # fmt: skip
    mode = train.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    mode.add_argument("--overwrite", action="store_true", help="replace a run that already exists in --out, or "
                      "train into a folder that holds no run (a model there is replaced, other files are kept; a "
                      "code store or folder of shards is always refused)")  # fmt: skip

    presets = add_command(sub, "presets", run_presets, "list shipped configuration presets")
    presets.add_argument("group", nargs="?", choices=GROUPS)
    config = add_command(sub, "config", run_config, "print the resolved configuration of a preset with overrides",
                         "For AR models give codes=DIR: the vocabulary, code shape and classes come from the code "
                         "store and are marked so.")  # fmt: skip
    config.add_argument("group", choices=GROUPS)
    config.usage = "vqar config [-h] {tokenizer,ar} PRESET [key=value ...]"
    config.add_argument("overrides", nargs="+", metavar="PRESET [key=value ...]", help="preset name or YAML file, then "
                        "key=value overrides")  # fmt: skip
