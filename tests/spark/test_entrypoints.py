"""The spark-submit entry points, run in-process on the test session as spark-submit would run them:
synthetic files -> bronze and silver -> gold documents and profiles -> text embeddings. Each prints
one JSON line, and its counts reconcile with the step before and with the lake."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import ValidationError

from spark_jobs.entrypoints import (
    build_content,
    embed_items,
    generate_synthetic,
    import_amazon,
    import_generic,
    import_movielens,
    promote_silver,
)
from spark_jobs.importers.amazon import AmazonImportConfig
from spark_jobs.importers.movielens import MovieLensImportConfig
from spark_jobs.lake import Lake

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def run(main: Callable[[list[str]], int], argv: list[str], capsys) -> dict:
    assert main(argv) == 0
    (line,) = capsys.readouterr().out.splitlines()  # one JSON line: what an orchestrator reads
    return json.loads(line)


def test_the_entry_points_chain_from_raw_files_to_embeddings(spark, tmp_path, capsys) -> None:
    lake = ["--lake-root", str(tmp_path / "lake"), "--master", "local[2]", "--log-level", "WARNING"]
    raw = tmp_path / "raw"
    size = [
        "--users",
        "30",
        "--items",
        "40",
        "--events",
        "600",
        "--image-size",
        "0",
        "--log-level",
        "WARNING",
    ]
    assert run(generate_synthetic.main, ["--out", str(raw), *size], capsys)["num_events"] == 600

    imported = run(
        import_generic.main,
        ["--dataset", "ep", "--interactions", str(raw / "interactions"), "--items", str(raw / "items.parquet"),
         "--users", str(raw / "users.parquet"), "--logical-date", "2026-11-01", *lake],
        capsys,
    )  # fmt: skip
    bronze = {s["table"]: s for s in imported["bronze"]["sources"]}
    silver = {s["table"]: s for s in imported["silver"]["sources"]}
    assert [bronze[f"bronze.{t}"]["records_in"] for t in ("interactions", "items", "users")] == [600, 40, 30]
    for report in (*bronze.values(), *silver.values()):  # nothing lost: in = kept + quarantined
        assert report["records_in"] == report["imported"] + report["quarantined"]
    for table in ("interactions", "items", "users"):
        assert silver[f"silver.{table}"]["records_in"] == bronze[f"bronze.{table}"]["imported"]
    tables = Lake(spark, tmp_path / "lake")
    quarantine = tables.read("bronze.quarantine", partitions={"dataset": "ep"})
    for name, report in {**bronze, **silver}.items():  # the reports are what the lake holds
        assert tables.read(name, partitions={"dataset": "ep"}).count() == report["imported"], name
        assert quarantine.filter(quarantine["target_table"] == name).count() == report["quarantined"], name

    content = run(build_content.main, ["--dataset", "ep", *lake], capsys)
    assert (content["items"], content["users"]) == (40, 30)
    assert tables.read("gold.item_documents").count() == 40

    embed = ["--dataset", "ep", "--modality", "text", "--kind", "hashing", "--encoder-config", '{"dim": 16}']
    first = run(embed_items.main, [*embed, *lake], capsys)
    assert (first["items"], first["embedded"], first["skipped"]) == (40, 40, 0)
    again = run(embed_items.main, [*embed, *lake], capsys)  # a rerun does nothing
    assert (again["embedded"], again["skipped"], again["versions"]) == (0, 40, [])
    assert tables.read("gold.item_embeddings").count() == 40


def test_the_dataset_importers_and_promote_silver(spark, tmp_path, capsys) -> None:
    """``import_movielens`` and ``import_amazon`` on the hand-written fixtures (defects included), then
    ``promote_silver`` run again: counts reconcile, and the rerun leaves silver as it was."""
    lake = ["--lake-root", str(tmp_path / "lake"), "--master", "local[2]", "--log-level", "WARNING"]
    day = ["--logical-date", "2024-01-01"]
    bundle = tmp_path / "ml"
    shutil.copytree(FIXTURES / "movielens_mini", bundle)  # stored as *.fixture: not the licensed names
    for fixture in bundle.rglob("*.fixture"):
        fixture.rename(fixture.with_suffix(""))

    movielens = run(
        import_movielens.main, ["--data-dir", str(bundle), "--dataset", "mini", *day, *lake], capsys
    )
    amazon = run(
        import_amazon.main,
        ["--reviews", str(FIXTURES / "amazon" / "Movies_and_TV.jsonl"), "--meta",
         str(FIXTURES / "amazon" / "meta_Movies_and_TV.jsonl"), "--dataset", "az", *day, *lake],
        capsys,
    )  # fmt: skip
    tables = Lake(spark, tmp_path / "lake")
    for dataset, summary in (("mini", movielens), ("az", amazon)):  # nothing lost: in = kept + quarantined
        for s in summary["bronze"]["sources"] + summary["silver"]["sources"]:
            assert s["records_in"] == s["imported"] + s["quarantined"]
        for s in summary["silver"]["sources"]:  # silver reads all of bronze
            bronze = tables.read(s["table"].replace("silver.", "bronze."), partitions={"dataset": dataset})
            assert s["records_in"] == bronze.count()
    # u.data, u.item, u.user, item_extra.tsv; then 13 review lines, one blank, and 7 metadata lines
    assert [s["records_in"] for s in movielens["bronze"]["sources"]] == [11, 6, 4, 6]
    assert [s["records_in"] for s in amazon["bronze"]["sources"]] == [12, 7]

    before = sorted(map(tuple, tables.read("silver.interactions").collect()))
    again = run(promote_silver.main, ["--dataset", "az", *day, *lake], capsys)
    assert again["silver"]["sources"] == amazon["silver"]["sources"]
    assert sorted(map(tuple, tables.read("silver.interactions").collect())) == before
    marks = tables.version("bronze.quarantine")  # a promotion's commit there marks the day as in silver
    for typo in (["--dataset", "za", *day], ["--dataset", "az", "--logical-date", "2024-01-02"]):
        with pytest.raises(SystemExit, match=r"no bronze rows of .* dates imported: (2024-01-01|none)$"):
            promote_silver.main([*typo, *lake])
    assert tables.version("bronze.quarantine") == marks


def test_a_bad_dataset_name_is_refused_before_spark_starts(capsys) -> None:
    """An unset ``$DATASET`` gives ``--dataset ""``: refused as an argument, as by every import config."""
    for main, argv in (
        (import_movielens.main, ["--data-dir", "."]),
        (promote_silver.main, []),
        (build_content.main, []),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--dataset", ""])
        assert exit_info.value.code == 2
        assert "dataset name must be letters, digits" in capsys.readouterr().err
    for name in ("a b", "..", ".", "-x"):  # a folder name too: never the parent folder
        with pytest.raises(ValidationError, match=r"1 validation error .*\ndataset"):
            MovieLensImportConfig(data_dir=".", dataset=name)
    assert MovieLensImportConfig(data_dir=".", dataset="ml-100k.v2").dataset == "ml-100k.v2"
    with pytest.raises(ValidationError, match=r"1 validation error .*\ndataset"):
        AmazonImportConfig(reviews=".", dataset="")


def test_on_a_cluster_the_lake_must_be_named(monkeypatch) -> None:
    """The default lake ($HISAM_HOME/lake) is on the driver's disk: fine on local[*], an error under a
    cluster master unless --lake-root, the lake config or $HISAM_LAKE_ROOT names one."""
    from spark_jobs.entrypoints.common import check_lake_named

    monkeypatch.delenv("HISAM_LAKE_ROOT", raising=False)
    check_lake_named("local[2]", None)
    check_lake_named("yarn", "s3://bucket/lake")
    with pytest.raises(ValueError, match=r"'spark://host:7077' is a cluster, but no lake root was given"):
        check_lake_named("spark://host:7077", None)
    monkeypatch.setenv("HISAM_LAKE_ROOT", "s3://bucket/lake")
    check_lake_named("k8s://https://api:443", None)
    monkeypatch.delenv("HISAM_LAKE_ROOT")
    from types import SimpleNamespace

    from spark_jobs.entrypoints import common

    cluster = SimpleNamespace(sparkContext=SimpleNamespace(master="yarn"))
    monkeypatch.setattr(common, "get_spark", lambda app_name, master=None: cluster)
    args = common.parser("test", date=False).parse_args([])
    with pytest.raises(ValueError, match="'yarn' is a cluster"):  # every entry point's set-up checks it
        common.setup(args, "test")


def test_the_image_entrypoint_runs_commands_and_starts_kubernetes_executors(tmp_path) -> None:
    """Spark on Kubernetes starts executor pods from the hisam image with the argument ``executor``:
    the entry point starts Spark's KubernetesExecutorBackend from the pip-installed pyspark, with the
    driver's JVM options in their numeric order (``_10`` after ``_2``), which then fails only to reach
    a driver that is not there. ``airflow`` first checks its config's placeholders; any other command
    runs as given."""
    import os
    import subprocess
    import sys

    script = str(Path(__file__).resolve().parents[2] / "infra" / "docker" / "entrypoint.sh")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    echoed = subprocess.run([script, "echo", "a b", "c"], env=env, capture_output=True, text=True, check=True)
    assert echoed.stdout == "a b c\n"
    # `airflow ...`: every $VAR / ${VAR} of its airflow.cfg (outside comments) must be set, or the
    # option overridden by AIRFLOW__SECTION__KEY; else Airflow would take the placeholder's text for
    # the value (a JWT secret anyone can read in the repository)
    bin_dir, home = tmp_path / "bin", tmp_path / "airflow"
    bin_dir.mkdir()
    home.mkdir()
    (bin_dir / "airflow").write_text('#!/bin/sh\necho airflow "$@"\n')  # stands in for the real one
    (bin_dir / "airflow").chmod(0o755)
    cfg = "# ${IN_A_COMMENT}\nbefore = ${NO_SECTION}\n[api_auth]\njwt_secret = ${JWT}\n[database]\nconn = x$DB/${NAME}\n"
    (home / "airflow.cfg").write_text(cfg)
    airflow = {**env, "PATH": f"{bin_dir}:{env['PATH']}", "AIRFLOW_HOME": str(home), "JWT": "s", "DB": ""}

    def start(**extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [script, "airflow", "version"], env={**airflow, **extra}, capture_output=True, text=True
        )

    refused = start(NAME="n")
    assert refused.returncode == 78 and refused.stdout == ""
    assert "airflow.cfg needs $DB ([database] conn), unset or empty here" in refused.stderr
    overrides = ("AIRFLOW__DATABASE__CONN", "AIRFLOW__DATABASE__CONN_CMD", "AIRFLOW__DATABASE__CONN_SECRET")
    for extra in ({"NAME": "n", "DB": "d"}, *({name: "postgresql://..."} for name in overrides)):
        started = start(**extra)
        assert (started.returncode, started.stdout) == (0, "airflow version\n")
    executor = {
        "SPARK_JAVA_OPT_0": "-XshowSettings:properties",
        "SPARK_JAVA_OPT_2": "-Dhisam.order=two",
        "SPARK_JAVA_OPT_10": "-Dhisam.order=ten",  # the later option wins
        "SPARK_EXECUTOR_MEMORY": "256m",
        "SPARK_DRIVER_URL": "spark://CoarseGrainedScheduler@127.0.0.1:1",  # nothing listens on port 1
        "SPARK_EXECUTOR_ID": "1",
        "SPARK_EXECUTOR_CORES": "1",
        "SPARK_APPLICATION_ID": "spark-test",
        "SPARK_EXECUTOR_POD_IP": "127.0.0.1",
        "SPARK_EXECUTOR_POD_NAME": "executor-1",
        "SPARK_LOCAL_IP": "127.0.0.1",
    }
    run = subprocess.run(
        [script, "executor"],
        env={**env, **executor},
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert run.returncode != 0
    assert "hisam.order = ten" in run.stderr
    assert "KubernetesExecutorBackend: Started daemon" in run.stderr
    assert "Failed to connect to /127.0.0.1:1" in run.stderr
