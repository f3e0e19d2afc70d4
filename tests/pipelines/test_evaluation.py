"""``hisam evaluate`` (pipelines.evaluation) end to end on a tiny generic dataset: the report, the
MLflow runs it logs, the hand-written findings it keeps, and ``--reuse`` that re-runs nothing."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

from hisam_core.evaluation.harness import EvaluationConfig, assemble, json_safe, run_evaluation
from pipelines.cli import main as cli
from pipelines.evaluation import EXPERIMENT, FINDINGS, _reusable, pool_map, run_parallel, write_report
from pipelines.tracking import code_version

TINY = {
    "max_tokens": 48,
    "hmat": {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "ffn_size": 32},
    "id_ranker": {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "ffn_size": 32},
    "train": {"learning_rate": 3e-3, "warmup_steps": 5, "max_steps": 40, "batch_size": 16, "device": "cpu"},
    "tokenizer": {
        "model": {"dim": 8, "hidden_dim": 16, "shared_layers": 1, "codebook_size": 8, "psgr_heads": 2},
        "epochs": 4,
        "alignment_warmup_epochs": 1,
        "batch_size": 32,
        "init_sample_size": 60,
    },
    "rqvae": {"model": {"dim": 8, "hidden_dim": 16, "codebook_size": 8}, "epochs": 4, "batch_size": 32},
    "experiments": [
        {"name": "sasrec", "model": "sasrec", "description": "ID baseline"},
        {"name": "hisam_sft", "tokenizer": {"modalities": ["behavior", "text"]}},
    ],
    "sets": {"main": ["sasrec", "hisam_sft"]},
    "run": ["main"],
    "seeds": [0, 1],
    "target": {"candidate": "hisam_sft", "baselines": ["sasrec"], "metrics": ["gauc"]},
}


def test_evaluate_writes_the_report_logs_every_run_and_reuses_them(
    planted_interactions, tmp_path, mlflow_store, monkeypatch, caplog
):
    frame, modalities, item_ids = planted_interactions
    frame.to_csv(tmp_path / "interactions.csv", index=False)
    np.savez(tmp_path / "features.npz", item_ids=item_ids, **{f"emb_{m}": v for m, v in modalities.items()})
    config = {
        **TINY,
        "data": {
            "dataset": "generic",
            "path": str(tmp_path / "interactions.csv"),
            "allow_uncut_behavior": True,
        },
        "cache_dir": str(tmp_path / "cache"),
    }
    EvaluationConfig.model_validate(config)  # the test's own config is valid
    (tmp_path / "evaluation.yaml").write_text(yaml.safe_dump(config))
    results = tmp_path / "results"
    results.mkdir()
    (results / FINDINGS).write_text("## findings\n\nWritten by hand; kept across reruns.\n")
    monkeypatch.setenv("HISAM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store(tmp_path))
    common = ["--config", str(tmp_path / "evaluation.yaml"), "--features", str(tmp_path / "features.npz")]

    assert cli(["evaluate", *common, "--results", str(results), "--mlflow"]) == 0
    result = json.loads((results / "quality.json").read_text())
    assert [(r["experiment"], r["seed"]) for r in result["runs"]] == [
        ("sasrec", 0), ("sasrec", 1), ("hisam_sft", 0), ("hisam_sft", 1)
    ]  # fmt: skip
    gauc = [r["metrics"]["gauc"] for r in result["runs"] if r["experiment"] == "hisam_sft"]
    assert result["summary"]["hisam_sft"]["gauc"]["mean"] == pytest.approx(np.mean(gauc))
    (target,) = result["target"]
    assert target["margin"] == pytest.approx(
        result["summary"]["hisam_sft"]["gauc"]["mean"] - result["summary"]["sasrec"]["gauc"]["mean"]
    )
    report = (results / "quality.md").read_text()
    assert "## main" in report and "## target check" in report
    assert report.rstrip().endswith("Written by hand; kept across reruns.")

    client = MlflowClient()
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    assert set(by_name) == {"sasrec-seed0", "sasrec-seed1", "hisam_sft-seed0", "hisam_sft-seed1", "summary"}
    for record in result["runs"]:
        logged = by_name[f"{record['experiment']}-seed{record['seed']}"].data.metrics
        assert logged["gauc"] == pytest.approx(record["metrics"]["gauc"])
    artifacts = {a.path for a in client.list_artifacts(by_name["summary"].info.run_id)}
    assert {"quality.json", "quality.md"} <= artifacts

    (results / FINDINGS).write_text("## findings\n\nEdited.\n")
    assert cli(["evaluate", "--render", "--results", str(results)]) == 0
    assert (results / "quality.md").read_text() == report.replace(
        "Written by hand; kept across reruns.", "Edited."
    )
    older = json.loads((results / "quality.json").read_text())  # target rows of the best-baseline rule
    older["target"] = [
        {("best_baseline" if k == "closest_baseline" else k): v for k, v in row.items() if k != "missing"}
        for row in older["target"]
    ]
    (results / "quality.json").write_text(json.dumps(older))
    assert cli(["evaluate", "--render", "--results", str(results)]) == 0  # recomputed from the summary
    assert (results / "quality.md").read_text() == report.replace(
        "Written by hand; kept across reruns.", "Edited."
    )

    again = tmp_path / "again"
    caplog.clear()
    reuse = [f"--reuse={results / 'quality.json'}"]  # the = form: the report drops it all the same
    with caplog.at_level(logging.INFO, logger="pipelines.evaluation"):
        assert cli(["evaluate", *common, "--results", str(again), *reuse]) == 0
    assert "0 jobs to run (4 kept from an earlier result)" in caplog.text  # nothing trained again
    rerun = json.loads((again / "quality.json").read_text())
    assert rerun["runs"] == result["runs"] and rerun["summary"] == result["summary"]
    assert rerun["environment"]["command"] == f"hisam evaluate {' '.join(common)} --results {again}"

    other = {**result, "dataset": {**result["dataset"], "features": "0" * 40}}  # e.g. another encoder
    (tmp_path / "other.json").write_text(json.dumps(other))
    caplog.clear()
    assert (
        cli(["evaluate", *common, "--results", str(tmp_path / "x"), "--reuse", str(tmp_path / "other.json")])
        == 2
    )
    assert "--reuse: the earlier result was computed on other features (0000" in caplog.text
    assert result["dataset"]["features"] == rerun["dataset"]["features"] != other["dataset"]["features"]


@pytest.mark.parametrize(
    "given",
    [["--reuse", "q.json"], ["--reuse=q.json"], ["--reu", "q.json"], ["--reuse=--x"]],
)
def test_the_reported_command_drops_reuse_however_it_was_given(given):
    from pipelines.evaluation import without_option

    argv = ["--seeds", "0", *given, "--results", "out"]
    assert without_option(argv, "--reuse") == ["--seeds", "0", "--results", "out"]


def test_evaluate_without_the_dataset_is_a_clear_error(tmp_path, caplog):
    assert cli(["evaluate", "--data", str(tmp_path / "absent"), "--results", str(tmp_path)]) == 2
    assert "MovieLens-100K not found" in caplog.text


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (["--config", "absent.yaml"], "evaluation config absent.yaml does not exist or is not a file"),
        (["--config", "bad.yaml"], "foo"),  # an unknown key
        (["--config", "."], "evaluation config . does not exist or is not a file"),
        (["--run", "nosuch"], "unknown experiments or sets: ['nosuch']"),
        (["--reuse", "absent.json"], "--reuse absent.json: cannot read it (No such file or directory)"),
        (["--reuse", "bad.yaml"], "--reuse bad.yaml: not JSON"),
        (["--reuse", "other.json"], "--reuse other.json: not a quality.json (it needs 'config' and 'runs')"),
        (["--reuse", "shorter.json"], "--reuse: the earlier result differs in ['train']"),
    ],
)
def test_bad_evaluate_input_is_a_message_and_exit_code_2(given, message, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HISAM_HOME", str(tmp_path / "home"))
    (tmp_path / "bad.yaml").write_text("foo: 1\n")
    (tmp_path / "other.json").write_text('{"runs": []}\n')
    shorter = {"data": {"path": str(tmp_path / "ml")}, "train": {"max_steps": 7}}
    earlier = {"config": EvaluationConfig.model_validate(shorter).model_dump(mode="json"), "runs": []}
    (tmp_path / "shorter.json").write_text(json.dumps(earlier))
    (tmp_path / "ml" / "raw").mkdir(parents=True)
    (tmp_path / "ml" / "raw" / "u.data").write_text("")  # found: the error is the option's
    with caplog.at_level(logging.ERROR, logger="pipelines.evaluation"):
        assert cli(["evaluate", "--data", str(tmp_path / "ml"), *given]) == 2
    assert message in caplog.text
    assert not (tmp_path / "home" / "evaluation" / "results").exists()  # nothing written


def test_an_error_while_evaluating_keeps_its_traceback(tmp_path, monkeypatch):
    """Only the inputs are checked into exit code 2: a ValueError from training is a bug to see whole."""
    import pipelines.evaluation as evaluation

    def broken(*_args, **_kwargs):
        raise ValueError("shapes disagree deep in training")

    monkeypatch.setenv("HISAM_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(evaluation, "_features", lambda *_args: (None, None))
    monkeypatch.setattr(evaluation, "run_evaluation", broken)
    (tmp_path / "ml" / "raw").mkdir(parents=True)
    (tmp_path / "ml" / "raw" / "u.data").write_text("")
    with pytest.raises(ValueError, match="shapes disagree deep in training"):
        cli(["evaluate", "--data", str(tmp_path / "ml")])


def test_parallel_jobs_give_the_serial_result_and_the_sweep_reuses_the_base_runs(
    planted_interactions, tmp_path, caplog
):
    """``--workers 2`` splits the evaluation into one process per (experiment, seed), sweep points
    included: the merged result is the serial one. The sweep's base point is the main run itself, the
    other points are runs of their own, and a rerun with ``--reuse`` of the result trains nothing."""
    frame, modalities, item_ids = planted_interactions
    frame.to_csv(tmp_path / "interactions.csv", index=False)
    np.savez(tmp_path / "features.npz", item_ids=item_ids, **{f"emb_{m}": v for m, v in modalities.items()})
    data = {"dataset": "generic", "path": str(tmp_path / "interactions.csv"), "allow_uncut_behavior": True}
    config = EvaluationConfig.model_validate(
        {
            **TINY,
            "data": {**data, "features_path": str(tmp_path / "features.npz")},
            "cache_dir": str(tmp_path / "cache"),
            "scaling": {
                "experiment": "hisam_sft",
                "num_layers": [1, 2],
                "max_tokens": [24, 48],
                "seeds": [0],
            },
        }
    )
    serial = json_safe(run_evaluation(config))
    parallel = json_safe(run_parallel(config, str(tmp_path / "unused"), 2))
    timeless = [
        [{k: v for k, v in r.items() if k not in ("wall_s", "code_version")} for r in x["runs"]]
        for x in (serial, parallel)
    ]
    assert timeless[0] == timeless[1] and len(timeless[0]) == 4
    assert {r["code_version"] for r in parallel["runs"]} == {code_version()}  # each run names its code
    assert parallel["scaling"] == serial["scaling"] and parallel["summary"] == serial["summary"]

    (main,) = [r["metrics"] for r in serial["runs"] if (r["experiment"], r["seed"]) == ("hisam_sft", 0)]
    for axis, base, other in (("num_layers", 1, 2), ("max_tokens", 48, 24)):
        points = {p.pop("value"): p for p in serial["scaling"][axis]}
        assert points[base] == {"seed": 0, **main}
        assert points[other]["gauc"] != main["gauc"]

    with caplog.at_level(logging.INFO, logger="pipelines.evaluation"):
        again = json_safe(run_parallel(config, str(tmp_path / "unused"), 2, reuse=parallel))
    assert "0 jobs to run (4 kept from an earlier result)" in caplog.text
    assert again["runs"] == parallel["runs"] and again["scaling"] == parallel["scaling"]

    # an earlier result whose sweep holds a base run its table lacks: the table's row is a run again
    partial = {
        **parallel,
        "runs": [r for r in parallel["runs"] if (r["experiment"], r["seed"]) != ("hisam_sft", 0)],
    }
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pipelines.evaluation"):
        filled = json_safe(run_parallel(config, str(tmp_path / "unused"), 2, reuse=partial))
    assert "1 jobs to run (3 kept from an earlier result)" in caplog.text
    assert [{k: v for k, v in r.items() if k not in ("wall_s", "code_version")} for r in filled["runs"]] == (
        timeless[0]
    )
    # kept runs of another split (the interactions file re-exported under the same path): refused
    # before any job runs, also when every run would be kept
    for earlier in (partial, parallel):
        moved = {**earlier, "dataset": {**earlier["dataset"], "test": earlier["dataset"]["test"] + 1}}
        caplog.clear()
        with (
            caplog.at_level(logging.INFO, logger="pipelines.evaluation"),
            pytest.raises(ValueError, match="--reuse: the earlier result was measured on the split"),
        ):
            run_parallel(config, str(tmp_path / "unused"), 2, reuse=moved)
        assert "jobs to run" not in caplog.text
    # a redefined sweep experiment: its runs and its sweep points are all run again
    redefined = config.model_copy(deep=True)
    redefined.experiments[1].hmat = {"ffn_size": 24}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pipelines.evaluation"):
        changed = json_safe(run_parallel(redefined, str(tmp_path / "unused"), 2, reuse=parallel))
    assert "4 jobs to run (2 kept from an earlier result)" in caplog.text
    assert changed["scaling"]["num_layers"] != parallel["scaling"]["num_layers"]


def test_a_failed_job_cancels_the_jobs_not_yet_started(tmp_path, caplog):
    """One worker: the first job fails at once, each of the ten after it waits until that failure is
    logged and then leaves a file (so none can finish before the cancellation, however slow the
    machine). The failure is raised, noted with its job, the jobs not yet handed to the worker never
    run, and those already handed to it finish."""
    go, done = tmp_path / "go", tmp_path / "done"
    done.mkdir()
    later = [
        f"import pathlib, time\nwhile not pathlib.Path({str(go)!r}).exists(): time.sleep(0.01)\n"
        f"pathlib.Path({str(done / str(k))!r}).touch()"
        for k in range(10)
    ]

    class Release(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            go.touch()

    release = Release(logging.ERROR)
    logging.getLogger("pipelines.evaluation").addHandler(release)
    try:
        with (
            caplog.at_level(logging.ERROR, logger="pipelines.evaluation"),
            pytest.raises(ValueError, match="broken") as raised,
        ):
            pool_map(exec, ["raise ValueError('broken')", *later], 1, ["first", *map(str, range(10))])
    finally:
        logging.getLogger("pipelines.evaluation").removeHandler(release)
    assert raised.value.__notes__ == ["in job first"]
    assert "job first failed (ValueError: broken)" in caplog.text
    (cancelled,) = map(int, re.findall(r"(\d+) jobs not yet started are cancelled", caplog.text))
    assert cancelled >= 7  # at most one running and two queued calls (ProcessPoolExecutor) escape
    assert len(list(done.iterdir())) == 10 - cancelled  # every job not cancelled ran to its end


def test_a_worker_that_dies_fails_the_map_instead_of_hanging():
    """An out-of-memory kill takes the worker with it: the map must end with an error."""
    from concurrent.futures.process import BrokenProcessPool

    with pytest.raises(BrokenProcessPool) as raised:
        pool_map(os._exit, [3], 1, ["killed"])
    assert raised.value.__notes__ == ["in job killed"]


def test_pool_map_keeps_the_order_of_its_items():
    """The first item finishes last; its result still comes first."""
    slow_first = ["__import__('time').sleep(0.5) or 'a'", "'b'", "'c'"]
    assert pool_map(eval, slow_first, 2, ["a", "b", "c"]) == ["a", "b", "c"]


def test_set_seeds_without_seeds_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli(["evaluate", "--set-seeds", "main"])
    assert exit_.value.code == 2
    assert "expected SET=SEED[,SEED..], e.g. controls=0,1, got 'main'" in capsys.readouterr().err


def test_semantic_ids_are_cached_under_hisam_home_unless_told(tmp_path, monkeypatch):
    from pipelines.evaluation import configure, parser

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HISAM_HOME", str(tmp_path / "home"))
    args = parser(tmp_path, tmp_path)
    assert configure(args.parse_args([])).cache_dir == str(tmp_path / "home" / "evaluation")
    assert configure(args.parse_args(["--cache-dir", "given"])).cache_dir == "given"
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump({"cache_dir": "in-config"}))
    assert configure(args.parse_args(["--config", "eval.yaml"])).cache_dir == "in-config"
    parsed = args.parse_args(["--set-seeds", "controls=0,1", "main=2"])
    assert configure(parsed).seeds_per_set == {"controls": [0, 1], "main": [2]}


def test_the_movielens_bundle_is_found_from_any_folder_unless_a_path_is_given(tmp_path, monkeypatch):
    from pipelines.evaluation import configure, parser
    from pipelines.settings import DEFAULT_MOVIELENS

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HISAM_MOVIELENS_DIR", raising=False)
    args = parser(tmp_path, tmp_path)
    assert configure(args.parse_args([])).data.path == str(DEFAULT_MOVIELENS)  # beside the clone
    monkeypatch.setenv("HISAM_MOVIELENS_DIR", str(tmp_path / "ml"))
    assert configure(args.parse_args([])).data.path == str(tmp_path / "ml")
    assert configure(args.parse_args(["--data", "given"])).data.path == "given"
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump({"data": {"path": "in-config"}}))
    assert configure(args.parse_args(["--config", "eval.yaml"])).data.path == "in-config"
    shipped = Path(__file__).resolve().parents[2] / "configs" / "evaluation.yaml"
    assert configure(args.parse_args(["--config", str(shipped)])).data.path == str(tmp_path / "ml")


def test_threads_workers_and_steps_are_checked_and_threads_may_follow_the_command(tmp_path, monkeypatch):
    from pipelines.evaluation import configure, parser

    monkeypatch.setenv("HISAM_HOME", str(tmp_path))
    monkeypatch.setenv("HISAM_TORCH_THREADS", "3")
    args = parser(tmp_path, tmp_path)
    assert configure(args.parse_args([])).threads == 3  # `hisam --threads 3 evaluate`
    assert configure(args.parse_args(["--threads", "2"])).threads == 2  # `hisam evaluate --threads 2`
    assert configure(args.parse_args(["--steps", "7"])).train.max_steps == 7
    for bad in (["--workers", "-3"], ["--steps", "0"], ["--threads", "0"]):
        with pytest.raises(SystemExit):
            args.parse_args(bad)


def test_config_errors_are_one_line_per_key_naming_the_file(tmp_path, monkeypatch, caplog):
    """Not pydantic's multi-line dump: the file, then ``key: problem`` for each bad key. A missing
    file, and sweep options without a sweep, are one-line errors too."""
    from hisam_core.evaluation.harness import ScalingConfig
    from pipelines.evaluation import configure, main, parser

    monkeypatch.setenv("HISAM_HOME", str(tmp_path))
    bad = tmp_path / "eval.yaml"
    bad.write_text(yaml.safe_dump({"threads": 0, "hmat": {"num_layerz": 2}}))
    with caplog.at_level(logging.ERROR):
        assert main(["--config", str(bad)], results=tmp_path / "r") == 2
    (message,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert message.startswith(f"{bad}: ")
    assert "hmat.num_layerz: Extra inputs are not permitted" in message
    assert "threads: " in message and "\n" not in message and "errors.pydantic.dev" not in message
    assert not (tmp_path / "r").exists()  # nothing written before the check
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert main(["--config", str(tmp_path / "absent.yaml")], results=tmp_path / "r") == 2
        assert main(["--scaling-layers", "1", "2"], results=tmp_path / "r") == 2  # no sweep to shape
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR] == [
        f"evaluation config {tmp_path / 'absent.yaml'} does not exist or is not a file",
        "--scaling-layers and --scaling-tokens shape the sweep: add --scaling",
    ]
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"scaling": {"num_layers": [1]}}))  # the config asks for the sweep
    args = parser(tmp_path, tmp_path).parse_args(["--config", str(sweep), "--scaling-tokens", "48"])
    assert configure(args).scaling == ScalingConfig(num_layers=[1], max_tokens=[48])


def test_reuse_refuses_another_budget_and_reruns_redefined_experiments():
    from hisam_core.evaluation.baselines import ID_RANKER_VERSION
    from hisam_core.evaluation.semantic import CACHE_VERSIONS
    from hisam_core.ranker.attention import MASK_RULE

    config = EvaluationConfig.model_validate(TINY)
    earlier = {
        "config": config.model_dump(mode="json"),
        "runs": [{"experiment": "sasrec", "seed": 0}, {"experiment": "hisam_sft", "seed": 0}],
        "cache_versions": dict(CACHE_VERSIONS),
        "mask_rule": MASK_RULE,
        "id_ranker_version": ID_RANKER_VERSION,
    }
    assert _reusable(config, earlier) == earlier["runs"]
    # ID rankers of another version (or of a result that does not say): run again
    for version in (ID_RANKER_VERSION - 1, None):
        assert _reusable(config, {**earlier, "id_ranker_version": version}) == [
            {"experiment": "hisam_sft", "seed": 0}
        ]
    # HMATs trained under another rule for items of one instant (or a result that does not say)
    for rule in (MASK_RULE - 1, None):
        assert _reusable(config, {**earlier, "mask_rule": rule}) == [{"experiment": "sasrec", "seed": 0}]
    # IDs of another DST version (or of a result that does not say): the HMAT run is run again
    for versions in ({**CACHE_VERSIONS, "dst": CACHE_VERSIONS["dst"] - 1}, None):
        other = {**earlier, "cache_versions": versions} if versions else dict(earlier, cache_versions={})
        assert _reusable(config, other) == [{"experiment": "sasrec", "seed": 0}]
    rqvae_only = {**earlier, "cache_versions": {**CACHE_VERSIONS, "rqvae": 0}}  # DST runs do not read it
    assert _reusable(config, rqvae_only) == earlier["runs"]
    redefined = config.model_copy(
        update={
            "experiments": [
                config.experiments[0],
                config.experiments[1].model_copy(update={"pretrain": True}),
            ]
        }
    )
    assert _reusable(redefined, earlier) == [{"experiment": "sasrec", "seed": 0}]
    longer = config.model_copy(update={"train": config.train.model_copy(update={"max_steps": 41})})
    with pytest.raises(ValueError, match=r"differs in \['train'\]"):
        _reusable(longer, earlier)
    path = config.data.path
    elsewhere = config.model_copy(update={"data": config.data.model_copy(update={"path": path + "-other"})})
    with pytest.raises(ValueError, match=r"differs in \['data'\]"):
        _reusable(elsewhere, earlier)
    absolute = config.data.model_copy(update={"path": str(Path(path).resolve())})
    assert _reusable(config.model_copy(update={"data": absolute}), earlier) == earlier["runs"]  # same folder


def test_the_report_and_plot_mark_a_cold_metric_no_seed_measured(tmp_path):
    """A snapshot without cold test users: every cold metric is NaN. The report says "unmeasured"
    where a number would stand, the plot is drawn around the gap, and quality.json stays strict."""
    config = EvaluationConfig.model_validate(TINY)
    nan = float("nan")
    runs = [
        {"experiment": e, "seed": s, "num_parameters": 1, "metrics": {"gauc": g + s / 100, "cold_gauc": nan}}
        for e, g in (("sasrec", 0.6), ("hisam_sft", 0.7))
        for s in (0, 1)
    ]
    scaling = {
        "experiment": "hisam_sft",
        "seeds": [0],
        "num_layers": [{"value": v, "seed": 0, "gauc": 0.7, "cold_gauc": nan} for v in (1, 2)],
        "max_tokens": [{"value": v, "seed": 0, "gauc": 0.7, "cold_gauc": nan} for v in (24, 48)],
    }
    result = assemble(config, {"name": "tiny", "window_items": 8}, runs, scaling)
    result["environment"] = {"command": "hisam evaluate"}
    text = json.dumps(json_safe(result), allow_nan=False)
    assert "NaN" not in text and json.loads(text)["summary"]["sasrec"]["cold_gauc"]["mean"] is None
    _, md_path, png_path = write_report(result, tmp_path)
    report = md_path.read_text()
    assert "| hisam_sft | n/a | 0.7050 ± 0.0071 | n/a | unmeasured | n/a | n/a | 1 | 2 |" in report
    assert "| num_layers | 1 | 0.7000 | unmeasured |" in report
    from PIL import Image

    from hisam_core.evaluation.harness import plot_scaling

    pixels = np.asarray(Image.open(png_path))
    assert pixels.shape[:2] == (420, 1080)  # two panels, 9 x 3.5 inches at 120 dpi
    plot_scaling(scaling, tmp_path / "again.png")  # the report's plot is this sweep's, drawn around the gap
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again.png")), pixels)
    moved = {**scaling, "num_layers": [{**p, "gauc": 0.6} for p in scaling["num_layers"]]}
    plot_scaling(moved, tmp_path / "moved.png")
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "moved.png")), pixels)


def test_the_report_states_the_protocol_and_seeds_it_ran(tmp_path):
    protocol = {"positive_threshold": 4.0, "train_fraction": 0.8, "cold_start_threshold": 5}
    tokenizer = {**TINY["tokenizer"], "seed": 7}
    config = EvaluationConfig.model_validate({**TINY, "protocol": protocol, "tokenizer": tokenizer})
    runs = [{"experiment": "sasrec", "seed": 0, "num_parameters": 1, "metrics": {"gauc": 0.6}}]
    result = assemble(config, {"name": "tiny", "window_items": 8}, runs, None)
    result["environment"] = {"command": "hisam evaluate"}
    (tmp_path / "quality_scaling.png").write_bytes(b"an earlier sweep's plot")
    _, md_path, png_path = write_report(result, tmp_path)
    assert not png_path.exists()  # no sweep this run: nothing to log or read as its plot
    report = md_path.read_text()
    assert "rating > 4 positive (a label column wins); global chronological 80/20 split" in report
    assert "cold = fewer than 5 training interactions" in report
    assert "(trained once, seed 7), RQ-VAE 4 epochs (seed 0)" in report
