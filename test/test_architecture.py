"""The package's design, checked.

Layers import only downwards, outputs and settings are declared once, the command line starts without torch.
"""

import argparse
import ast
import dataclasses
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

import transcriptformer
from transcriptformer.api import TranscriptFormerModel
from transcriptformer.cli import COMMANDS, build_parser, subcommand_parser
from transcriptformer.cli.common import USE_RAW
from transcriptformer.config import DataConfig, PredictConfig
from transcriptformer.engine.config import (
    FORMER_KEYS,
    SECTION_OF,
    SECTIONS,
    HardwareConfig,
    InputConfig,
    ModelRunConfig,
    OutputConfig,
    RunConfig,
    apply_overrides,
)
from transcriptformer.evaluation.config import EvaluateConfig
from transcriptformer.model.lora import LoraConfig
from transcriptformer.model.outputs import OUTPUT_KEYS
from transcriptformer.tasks.embed import EmbedTask
from transcriptformer.tasks.perturb import PerturbConfig
from transcriptformer.tasks.score import ScoreConfig, ScoreTask
from transcriptformer.training.config import (
    CLASSIFY_DEFAULTS,
    TASKS,
    ClassifyConfig,
    FinetuneConfig,
    OptimConfig,
    TrainDataConfig,
    TrainerConfig,
    task_default,
)

PACKAGE = Path(transcriptformer.__file__).parent

# Bottom to top. A module may import from its own layer and the layers below it, never from a layer above.
LAYERS = {
    "version": 0,
    "errors": 0,
    "runtime": 0,
    "config": 0,
    "safe_load": 0,
    "console": 0,
    "data": 1,
    "model": 2,
    "annotation": 3,
    "checkpoint": 3,
    "pipeline": 3,
    "hub": 3,
    "engine": 3,
    "tasks": 4,
    "perturbation": 4,
    "training": 4,
    "doctor": 4,
    "generation": 4,
    "api": 5,
    "evaluation": 5,
    "cli": 6,
    "__main__": 6,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    return LAYERS[top]


def package_imports(path: Path) -> list[str]:
    """Every ``transcriptformer.*`` module that a file imports, at any depth (functions, TYPE_CHECKING)."""
    imported = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("transcriptformer"):
            imported += [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            imported += [alias.name for alias in node.names if alias.name.startswith("transcriptformer")]
    return imported


SOURCES = sorted(PACKAGE.rglob("*.py"))
MODULES = {module_name(path): path for path in SOURCES}


def resolve(imported: str) -> str:
    """The module behind ``package.module.name`` (a name imported from a module, or a module itself)."""
    while imported not in MODULES:
        imported = imported.rsplit(".", 1)[0]
    return imported


def test_every_module_has_a_layer():
    for module in MODULES:
        if module != "transcriptformer":
            layer(module)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: module_name(p))
def test_no_module_imports_from_a_higher_layer(path):
    importer = module_name(path)
    if importer == "transcriptformer":  # the package's facade re-exports the API lazily
        return
    for imported in map(resolve, package_imports(path)):
        if imported in ("transcriptformer", "transcriptformer.version"):
            assert imported == "transcriptformer.version", f"{importer} imports the package facade"
            continue
        assert layer(imported) <= layer(importer), f"{importer} (layer {layer(importer)}) imports {imported}"


# The commands that run their task through the engine (engine.run.run_task, by way of cli.common.run_task, which
# checks the task's settings before torch loads), and their task.
ENGINE_COMMANDS = {
    "inference": "EmbedTask",
    "score": "ScoreTask",
    "predict-labels": "ClassifyTask",
    "generate": "GenerateTask",
    "annotate": "AnnotateTask",
    "perturb": "PerturbTask",
    "screen": "ScreenTask",
}


@pytest.mark.parametrize("command", sorted(ENGINE_COMMANDS))
def test_commands_run_their_task_through_the_engine(command):
    imported = package_imports(MODULES[f"transcriptformer.cli.{command.replace('-', '_')}"])
    assert "transcriptformer.cli.common.run_task" in imported, command
    assert "transcriptformer.engine.run.run_task" in package_imports(MODULES["transcriptformer.cli.common"])
    assert any(name.endswith(f".{ENGINE_COMMANDS[command]}") for name in imported), command


def test_the_engine_names_no_column_or_key_of_a_task():
    from transcriptformer.tasks import score

    names = {*score.ScoreTask().added_obs_columns(), score.QC_KEY, score.GENE_SCORE_KEY}
    for module, path in MODULES.items():
        if module.startswith("transcriptformer.engine"):
            text = path.read_text()
            assert not [name for name in names if f'"{name}"' in text], module


def test_the_api_and_the_command_line_hold_no_batch_loop():
    """Jobs run through the tasks; only TranscriptFormerModel.predict returns the batch loop's raw outputs."""
    for module, path in MODULES.items():
        if module == "transcriptformer.api" or module.startswith("transcriptformer.cli"):
            loops = {name for name in package_imports(path) if name.startswith("transcriptformer.pipeline.predict_")}
            assert loops <= {"transcriptformer.pipeline.predict_positions"}, module


def test_command_modules_share_helpers_only_through_cli_common():
    for module, path in MODULES.items():
        if module.startswith("transcriptformer.cli.") and module != "transcriptformer.cli.common":
            others = {resolve(m) for m in package_imports(path) if resolve(m).startswith("transcriptformer.cli")}
            assert others <= {"transcriptformer.cli.common"}, f"{module} imports {others}"


def literal_strings(node: ast.AST) -> set[str]:
    return {e.value for e in getattr(node, "elts", []) if isinstance(e, ast.Constant) and isinstance(e.value, str)}


def test_outputs_are_listed_in_one_module_only():
    """No tuple, list or set of several output names outside model/outputs.py (where OUTPUTS declares them)."""
    for module, path in MODULES.items():
        if module == "transcriptformer.model.outputs":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Tuple | ast.List | ast.Set):
                assert len(literal_strings(node) & set(OUTPUT_KEYS)) < 2, f"{module}:{node.lineno} lists outputs"


def test_the_end_target_rule_is_written_once():
    holders = [module for module, path in MODULES.items() if "seq_len - 1" in path.read_text()]
    assert holders == ["transcriptformer.model.outputs"]


def flag_defaults(name: str) -> dict[str, object]:
    """Each flag's default by setting name; a hidden former name of a flag has none."""
    actions = subcommand_parser(build_parser([name]), name)._actions
    return {a.dest: a.default for a in actions if a.option_strings and a.help != argparse.SUPPRESS}


def run_settings(config: RunConfig) -> dict[str, object]:
    """Every setting of a run that a flag sets, by name (lists as lists)."""
    values = {name: getattr(getattr(config, section), name) for name, section in SECTION_OF.items()}
    return {name: list(value) if isinstance(value, tuple) else value for name, value in values.items()}


def test_setting_defaults_are_written_once():
    predict = PredictConfig()
    assert RunConfig().predict == predict  # the batch loop's settings are the run's
    api = inspect.signature(TranscriptFormerModel.predict).parameters
    for name in ("output_keys", "batch_size", "max_tokens", "precision"):
        assert api[name].default == getattr(predict, name), name
    embed_api = inspect.signature(TranscriptFormerModel.embed).parameters
    for name in ("batch_size", "max_tokens", "precision"):
        assert embed_api[name].default == getattr(predict, name), name
    score_api = inspect.signature(TranscriptFormerModel.score).parameters
    for name in ("batch_size", "max_tokens", "precision"):
        assert score_api[name].default == getattr(predict, name), name

    score = ScoreConfig()
    assert score_api["outlier_threshold"].default == score.outlier_threshold
    score_flags = flag_defaults("score")
    assert score_flags.pop("outlier_threshold") == score.outlier_threshold
    for command, flags, run in [
        ("inference", flag_defaults("inference"), RunConfig()),
        ("score", score_flags, score.run_defaults()),
    ]:
        assert USE_RAW[flags.pop("use_raw")] == run.input.use_raw, command
        for name, value in run_settings(run).items():
            if name in flags:
                assert flags[name] == value, (command, name)
    finetune = flag_defaults("finetune")
    data, optim, trainer = TrainDataConfig(), OptimConfig(), TrainerConfig()
    # The settings whose default depends on the task: no flag default; the task's, from the dataclasses and
    # CLASSIFY_DEFAULTS, applied when the flag is left out.
    for dest, section, name in [
        ("batch_size", "data", "batch_size"),
        ("val_fraction", "data", "val_fraction"),
        ("lr", "optim", "lr"),
        ("warmup_steps", "optim", "warmup_steps"),
        ("epochs", "trainer", "max_epochs"),
        ("early_stopping_patience", "trainer", "early_stopping_patience"),
        ("lora_target_modules", "lora", "target_modules"),
    ]:
        assert finetune.pop(dest) is None, dest
        for task in TASKS:
            expected = CLASSIFY_DEFAULTS.get(section, {}).get(name) if task == "classify" else None
            section_defaults = {"data": data, "optim": optim, "trainer": trainer, "lora": LoraConfig()}[section]
            assert task_default(task, section, name) == (expected or getattr(section_defaults, name)), (task, dest)
    pairs = {
        "n_data_workers": data.n_data_workers,
        "weight_decay": optim.weight_decay,
        "max_steps": trainer.max_steps,
        "precision": trainer.precision,
        "attention_backend": trainer.attention_backend,
        "device": trainer.device,
        "seed": trainer.seed,
        "task": FinetuneConfig.task,
        **{field.name: getattr(ClassifyConfig(), field.name) for field in dataclasses.fields(ClassifyConfig)},
    }
    for dest, default in pairs.items():
        assert finetune[dest] == default, dest
    evaluate = subcommand_parser(build_parser(["evaluate"]), "evaluate")._actions
    fields = {field.name: field for field in dataclasses.fields(EvaluateConfig)}
    for action in evaluate:
        if action.dest in fields and not action.required:
            field = fields[action.dest]
            expected = field.default_factory() if field.default is dataclasses.MISSING else field.default
            assert action.default == expected, action.dest

    perturb = flag_defaults("perturb")
    perturb_api = inspect.signature(TranscriptFormerModel.perturb).parameters
    for field in dataclasses.fields(PerturbConfig):
        assert perturb[field.name] == (list(field.default) if isinstance(field.default, tuple) else field.default)
        if field.name in perturb_api:
            assert perturb_api[field.name].default == field.default, field.name
    assert perturb["chunk_size"] == perturb_api["chunk_size"].default == OutputConfig.chunk_size
    for name in ("batch_size", "max_tokens", "precision"):
        assert perturb[name] == perturb_api[name].default == getattr(predict, name), name
    assert flag_defaults("predict-labels")["batch_size"] == predict.batch_size


# One suffix for the dataclasses of settings: Config. These still carry their former names, each to become
# <Name>Config: every former name is renamed; the list only shrinks.
FORMER_SETTINGS_NAMES: set[str] = set()
OTHER_SETTINGS_SUFFIXES = ("Settings", "Section", "Options", "Params", "Parameters", "Conf")


def package_dataclasses() -> dict[str, str]:
    """Each dataclass defined in the package, by name, with its module."""
    found = {}
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any("dataclass" in ast.unparse(d) for d in node.decorator_list):
                found[node.name] = module_name(path)
    return found


def test_settings_dataclasses_are_named_config():
    names = package_dataclasses()
    other = sorted(n for n in names if n.endswith(OTHER_SETTINGS_SUFFIXES) and n not in FORMER_SETTINGS_NAMES)
    assert not other, f"settings dataclasses are named <Name>Config: {other}"
    assert FORMER_SETTINGS_NAMES <= set(names), "a former name was renamed: take it off FORMER_SETTINGS_NAMES"
    for task in (EmbedTask(), ScoreTask()):  # a task's settings too
        assert type(task.settings).__name__.endswith("Config"), task.name


# Flags of a run that set no setting of the run's dataclasses, and flags that keep the original release's name.
NOT_SETTINGS = {"help", "verbosity", "config_override", "dry_run", "disable_compile_block_mask"}
ORIGINAL_FLAG_NAMES = {"data_files": "--data-file", "use_oom_dataloader": "--oom-dataloader"}
# Flags of finetune named otherwise than the Lightning setting they set (flag -> field of TrainerConfig).
OTHER_NAMES_OF_TRAINER_SETTINGS = {"epochs": "max_epochs", "gradient_clip": "gradient_clip_val"}


def field_names(*settings: type, prefix: str = "") -> set[str]:
    """The names of the fields of the dataclasses ``settings``, each after ``prefix``."""
    return {prefix + field.name for cls in settings for field in dataclasses.fields(cls)}


RUN_SETTINGS = field_names(InputConfig, OutputConfig, PredictConfig, HardwareConfig, ModelRunConfig, DataConfig)
FINETUNE_SETTINGS = field_names(FinetuneConfig, TrainDataConfig, OptimConfig, TrainerConfig, ClassifyConfig)
FINETUNE_SETTINGS |= field_names(LoraConfig, prefix="lora_") | {"train_heads"}  # --lora-r: LoraConfig.r
FINETUNE_SETTINGS |= set(OTHER_NAMES_OF_TRAINER_SETTINGS) | {"overwrite"}  # overwrite: run_finetuning's keyword


@pytest.mark.parametrize(
    ("command", "fields"),
    [
        ("inference", RUN_SETTINGS),
        ("score", RUN_SETTINGS | field_names(ScoreConfig)),
        ("finetune", FINETUNE_SETTINGS),
    ],
)
def test_a_flag_and_its_setting_share_one_name(command, fields):
    """Each flag of a run sets the field of its name (``--max-tokens``: ``max_tokens``); former names are hidden."""
    for action in subcommand_parser(build_parser([command]), command)._actions:
        if not action.option_strings or action.dest in NOT_SETTINGS:
            continue
        assert action.dest in fields, f"{command} {action.option_strings}: no setting {action.dest}"
        if action.help != argparse.SUPPRESS:  # a shown flag; a hidden one is a former name that still works
            flag = ORIGINAL_FLAG_NAMES.get(action.dest, "--" + action.dest.replace("_", "-"))
            assert action.option_strings[0] == flag, (command, action.option_strings, action.dest)


# The keys of the original release's model.inference_config node (a run's settings before they were split by concern).
FORMER_INFERENCE_CONFIG = {
    "data_files", "soma", "census_version", "organism", "obs_filter", "soma_measurement", "soma_x_layer",
    "output_path", "output_filename", "output_format", "output_soma", "batch_size", "max_tokens", "output_keys",
    "obs_keys", "precision", "pretrained_embedding", "adapter", "emb_type", "embedding_layer_index", "device",
    "num_gpus", "n_data_workers", "use_raw", "remove_duplicate_genes", "overwrite", "resume", "chunk_size",
    "attention_backend", "use_oom_dataloader", "keep_counts", "soma_block_cells",
}  # fmt: skip


def test_a_setting_of_a_run_lives_in_one_node_and_its_former_key_still_sets_it():
    """One dataclass per concern, each setting in one of them; ``model.inference_config.<name>`` still works."""
    names = [field.name for cls in (*SECTIONS.values(), ModelRunConfig) for field in dataclasses.fields(cls)]
    assert len(names) == len(set(names)), sorted(name for name in names if names.count(name) > 1)
    assert all(cls.__name__.endswith("Config") for cls in SECTIONS.values())
    former = {key.removeprefix("model.inference_config.") for key in FORMER_KEYS if "inference_config" in key}
    assert former == FORMER_INFERENCE_CONFIG
    config = apply_overrides(
        RunConfig(),
        [
            "model.inference_config.batch_size=3",
            "model.inference_config.obs_keys=[cell_type,assay]",
            "model.inference_config.obs_keys.1=tissue",
            "model.inference_config.num_gpus=2",
            "model.inference_config.data_files=[a.h5ad]",
            "model.inference_config.adapter=adapters",
            "model.data_config.use_raw=false",  # the original release's place of use_raw
            "predict.max_tokens=500",
        ],
    )
    assert (config.predict.batch_size, config.predict.max_tokens, config.output.obs_keys) == (
        3,
        500,
        ["cell_type", "tissue"],
    )
    assert (config.hardware.num_gpus, config.input.data_files, config.model.adapter) == (2, ["a.h5ad"], "adapters")
    assert config.input.use_raw is False
    with pytest.raises(ValueError, match="'batchsize' is no setting of a run"):
        apply_overrides(RunConfig(), ["model.inference_config.batchsize=3"])


# Flags of other programs that library code names in the commands it runs or suggests.
OTHER_PROGRAMS_FLAGS = {"--query-gpu", "--format", "--yes", "--recursive"}
# A whole command line, such as the one that wrote a folder ('transcriptformer finetune --task classify').
COMMAND_LINE = re.compile(r"transcriptformer [a-z][a-z-]*(?:[^'\"`\n\\]|\\\n)*")


def flags_in_messages(path: Path) -> set[str]:
    """The ``--flag`` words in the strings of a module; docstrings and whole command lines may name flags."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    parts_of_fstrings = {id(part) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for part in node.values}
    strings = [  # an f-string whole, each placeholder as {}
        "".join(part.value if isinstance(part, ast.Constant) else "{}" for part in node.values)
        for node in ast.walk(tree)
        if isinstance(node, ast.JoinedStr)
    ]
    strings += [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docstrings | parts_of_fstrings
    ]
    flag = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]+")
    return {found for text in strings for found in flag.findall(COMMAND_LINE.sub("", text))}


def test_the_library_names_parameters_not_flags():
    """Messages of library code name ``max_genes``; the command line says ``--max-genes`` (cli.main rewords)."""
    naming = {}
    for path in SOURCES:
        name = module_name(path)
        if not name.startswith("transcriptformer.cli") and (flags := flags_in_messages(path) - OTHER_PROGRAMS_FLAGS):
            naming[name] = sorted(flags)
    assert not naming, f"name the parameter (`overwrite=True`, max_genes), not the flag: {naming}"


HEAVY = ("torch", "anndata", "lightning", "peft", "hydra", "scipy")


@pytest.mark.parametrize("argv", [["--help"], ["--version"], *[[name, "--help"] for name in COMMANDS]])
def test_help_loads_no_heavy_library(argv):
    code = (
        "import sys\n"
        "from transcriptformer.cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout[-500:]
