"""``hisam``: the one command-line entry point.

``hisam demo`` runs the whole lifecycle through the real Airflow DAGs on the embedded default;
``hisam run <step>`` runs one pipeline step (the same function the Airflow task calls);
``hisam rollback`` restores the previous champion; ``hisam recommend`` shows one user's top items
from the champion; ``hisam steps`` lists the steps; ``hisam evaluate`` runs the offline comparison
(:mod:`pipelines.evaluation`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import sys
import traceback
from pathlib import Path
from types import TracebackType

from pipelines.settings import LOG_LEVELS, Settings, masked, positive_int_arg, redacted
from pipelines.steps import CONFIG_ENV, STEPS, THREADS_ENV, apply_torch_threads

log = logging.getLogger("hisam")
#: Exception classes of a failed connection, by name, from these database and HTTP client packages.
CONNECTION_ERRORS = frozenset({"OperationalError", "ConnectionError", "NewConnectionError", "MaxRetryError"})
CLIENT_PACKAGES = frozenset(
    {"sqlalchemy", "psycopg", "psycopg2", "sqlite3", "pymysql", "requests", "urllib3"}
)
#: What an ``OperationalError`` of a failed connection says (others, "no such table", are not one).
CONNECTION_WORDS = ("connect", "unable to open", "timeout", "timed out", "could not translate host")

#: Exit code of a step whose data failed a quality gate (the usage and config errors' is 2).
DATA_QUALITY_EXIT = 4

EPILOG = """\
Config: run, rollback and recommend read one YAML file (pipelines.config.PipelineConfig; unknown keys are
errors): --config, else $HISAM_PIPELINE_CONFIG, else configs/pipeline.yaml; demo reads --config, else
configs/pipeline.yaml (never $HISAM_PIPELINE_CONFIG, and it ignores MLFLOW_TRACKING_URI, HISAM_LAKE_ROOT,
HISAM_ARTIFACT_ROOT, AIRFLOW_HOME, AIRFLOW__DATABASE__SQL_ALCHEMY_CONN, HISAM_NOTIFY_*, HISAM_SPARK_MASTER
and HISAM_SPARK_CONF: the embedded default, even in the production image; recommend after a MovieLens demo:
--config $HISAM_HOME/demo_pipeline.yaml);
`hisam evaluate --config` takes its own EvaluationConfig YAML (built-in defaults otherwise).
State goes under $HISAM_HOME (default .hisam in the current directory): the Delta lake ($HISAM_LAKE_ROOT
to put it elsewhere), the MLflow store ($MLFLOW_TRACKING_URI, artifacts $HISAM_ARTIFACT_ROOT), Airflow's
database, GX Data Docs, alerts, evaluation results and caches. The README lists every HISAM_* variable.

Exit codes: 0 done or skipped; 1 an unexpected error (its traceback), an unreachable database or server,
or a failed demo task; 2 a usage, config or parameter error, or a missing upstream table (the message
says what to fix; --log-level DEBUG adds the traceback); 3 rolled back but not refreshed; 4 the data
failed a quality gate (alerted; bronze.quarantine lists the rows): retrying the same input cannot help.

Examples:
  hisam demo                                   # the four DAGs end to end, then a summary
  hisam run ingest --logical-date 2026-11-22   # one step for one day
  hisam run build-sequences --param tokenizer_version=dst-YYYYMMDD  # a registered DST version
  hisam rollback                               # @previous becomes @champion again (refreshed)
  hisam recommend 196 --top-k 5 --config .hisam/demo_pipeline.yaml  # after `hisam demo` on MovieLens
  hisam evaluate --run main --seeds 0 1 2      # offline comparison on MovieLens-100K (--help: options)
"""


def _param(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    return key, value


def _date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected YYYY-MM-DD, got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hisam",
        description=(
            "Hi-SAM recommender pipeline: the Disentangled Semantic Tokenizer (DST) turns item text,\n"
            "images and behaviour into 6 semantic tokens; the Hierarchical Memory-Anchor Transformer\n"
            "(HMAT) ranks candidates from a user's token history."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--log-level", default="INFO", choices=LOG_LEVELS, help="default INFO")
    parser.add_argument(
        "--threads",
        type=_threads,
        default=os.environ.get(THREADS_ENV, "1"),  # a string default goes through ``type`` at parse time
        help="torch intra-op threads (default $HISAM_TORCH_THREADS or 1, also read by Airflow tasks: the models here are small, "
        "and extra threads contend with Spark on a small machine; raise it on large CPU nodes). A rerun "
        "with the same data, config and thread count trains the same weights; another count does not",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(
        p: argparse.ArgumentParser, default: str = f"${CONFIG_ENV} or configs/pipeline.yaml"
    ) -> argparse.ArgumentParser:
        p.add_argument("--config", type=Path, help=f"pipeline YAML (default {default})")
        return anywhere(p)

    def anywhere(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        """The global options also after the command (`hisam run ingest --threads 2`); SUPPRESS keeps
        the global value when the command's is not given."""
        p.add_argument(
            "--threads", type=_threads, default=argparse.SUPPRESS, help="torch threads: as `hisam --threads`"
        )
        p.add_argument(
            "--log-level", choices=LOG_LEVELS, default=argparse.SUPPRESS, help="as `hisam --log-level`"
        )
        return p

    demo = with_config(
        sub.add_parser(
            "demo",
            help="run the whole lifecycle through the Airflow DAGs on the embedded default",
            description="Run hisam_features, hisam_tokenizer, hisam_pretrain and hisam_finetune with "
            "dag.test() on MovieLens-100K when present (else the synthetic dataset), then print the "
            "tables and versions written, the metrics, the champion, and how to open MLflow and Data Docs. "
            "It reads --config, else configs/pipeline.yaml (not $HISAM_PIPELINE_CONFIG), but keeps none of "
            "its stores: the lake, MLflow and Airflow are under $HISAM_HOME, alerts go to the log and "
            "$HISAM_HOME/alerts.jsonl. One home holds one dataset's models: another dataset is refused. "
            "Example: HISAM_HOME=.hisam-synthetic hisam --threads 2 demo --dataset synthetic",
        ),
        default=f"configs/pipeline.yaml; ${CONFIG_ENV} is ignored",
    )
    demo.add_argument(
        "--dataset",
        choices=["auto", "movielens", "synthetic"],
        default="auto",
        help="auto (default): MovieLens-100K when its bundle exists (a --movielens-dir given must hold one), "
        "else the config's own source (the default config's: the bundled synthetic data); synthetic: the "
        "bundled synthetic data, whatever the config's source",
    )
    demo.add_argument(
        "--movielens-dir",
        type=Path,
        help="MovieLens-100K bundle (default $HISAM_MOVIELENS_DIR, else ../shared/data/movielens-100k "
        "beside the repository)",
    )

    run = with_config(
        sub.add_parser(
            "run",
            help="run one pipeline step",
            description="Run one pipeline step for one logical date: the function the Airflow task calls, "
            "and print its summary as JSON. `hisam run evaluate` is the daily step (candidate vs "
            "@champion), not `hisam evaluate`. Example: hisam run ingest --logical-date 2026-11-22",
        )
    )
    run.add_argument(
        "step",
        type=lambda name: name.replace("_", "-"),  # an Airflow task id names the same step
        choices=list(STEPS),
        metavar="STEP",
        help="the step to run (`hisam steps` lists them; an Airflow task id such as build_sequences works too)",
    )
    run.add_argument(
        "--logical-date",
        type=_date,
        default=dt.datetime.now(dt.UTC).date(),
        help="YYYY-MM-DD (default today, UTC)",
    )
    run.add_argument(
        "--param",
        type=_param,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="step parameter (repeatable): tokenizer_version=dst-YYYYMMDD (train-tokenizer, "
        "tokenize-catalogue, activate-tokenizer: default dst-<logical date>; build-sequences, "
        "validate-samples, samples-ready: default the @current tokenizer; pretrain, finetune: the "
        "version validate-samples gated, skipping when @current has moved since), force=true "
        "(train-tokenizer, activate-tokenizer: train or activate an older month's tokenizer although @current is newer; "
        "train-tokenizer also trains in a new run on today's embeddings instead of continuing a stopped "
        "run, unless that is a forced one that stopped before its health check; "
        "pretrain, finetune: train the day's model again from step 0 in a new MLflow run and register a "
        "new version; a forced run that stopped midway is continued), skip_without_tokenizer=true "
        "(build-sequences, tokenize-new-items, samples-ready: skip instead of failing before the first "
        "tokenizer is activated), samples_version=N (pretrain, finetune, evaluate: the gold.samples "
        "version to read; default the newest one validate-samples passed, and for evaluate the one the "
        "candidate was trained on; evaluate's tokenizer_version must be the candidate's), user, top_k, "
        "alias, include_seen (recommend: as `hisam recommend`). A key the step does not read is an "
        "error; `hisam steps` lists each step's keys",
    )

    sub.add_parser(
        "evaluate",
        help="offline evaluation: Hi-SAM vs baselines and ablations (Sec. 4.1-4.3)",
        description="Offline evaluation (pipelines.evaluation); `hisam evaluate --help` lists its options.",
        add_help=False,
    )

    with_config(
        sub.add_parser(
            "rollback",
            help="restore @previous as @champion (then refresh it with the items that arrived since)",
            description="Restore the previous champion ranker, and register it again with the semantic IDs "
            "its tokenizer version gained since it was packaged, so it serves every item at once. "
            "Exits 3 when the rollback stands but that refresh failed (then run `hisam run "
            "refresh-champion`). Example: hisam rollback --config configs/production.yaml",
        )
    )
    recommend = with_config(
        sub.add_parser(
            "recommend",
            help="one user's top-K items from @champion",
            description="Score every item the ranker has semantic IDs for, still in silver.items, that the "
            "user has not interacted with (--include-seen keeps those), from the user's "
            "history in gold.samples and profile in gold.user_profiles, with the registered ranker "
            "(one-pass ranking), and print the top K with titles and scores as JSON. Writes nothing. "
            "Example: hisam recommend 196 --top-k 5 --config .hisam/demo_pipeline.yaml",
        )
    )
    recommend.add_argument(
        "user", help="the user's id in the source (user_key of silver.interactions, else of silver.users)"
    )
    recommend.add_argument("--top-k", type=positive_int_arg, default=10, help="how many items (default 10)")
    recommend.add_argument(
        "--alias", default="champion", help="registry alias of the ranker (default champion)"
    )
    recommend.add_argument(
        "--include-seen", action="store_true", help="also rank items the user has interacted with"
    )
    anywhere(
        sub.add_parser(
            "steps",
            help="list the pipeline steps",
            description="List the pipeline steps with what each does.",
        )
    )
    return parser


def split_evaluate(argv: list[str]) -> tuple[list[str], list[str]]:
    """``(argv, forwarded)``: when the command is ``evaluate``, everything after it belongs to
    :mod:`pipelines.evaluation`, verbatim (``hisam run evaluate ...`` is the step, not this)."""
    at = 0
    while at < len(argv) and argv[at].startswith("-"):  # global options before the command
        at += 1 if "=" in argv[at] or argv[at] in ("-h", "--help") else 2
    if at < len(argv) and argv[at] == "evaluate":
        return argv[: at + 1], argv[at + 1 :]
    return argv, []


def _threads(value: str) -> int:
    try:
        return positive_int_arg(value)
    except argparse.ArgumentTypeError as err:
        raise argparse.ArgumentTypeError(f"{err} (from --threads or ${THREADS_ENV})") from None


class RedactingFormatter(logging.Formatter):
    """Log lines, tracebacks included, with every URI in them :func:`~pipelines.settings.redacted`:
    an error's message may quote a tracking URI with its password."""

    def format(self, record: logging.LogRecord) -> str:
        return redacted(super().format(record))


def redacting_excepthook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
    """Python's report of an uncaught exception, with every URI in it redacted."""
    sys.stderr.write(redacted("".join(traceback.format_exception(kind, value, tb))))


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    argv, forwarded = split_evaluate(sys.argv[1:] if argv is None else list(argv))
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:  # the CLI's own process (not a caller that set up logging)
        handler = logging.StreamHandler()
        handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.basicConfig(level=args.log_level, handlers=[handler])
        sys.excepthook = redacting_excepthook  # a bug's traceback is printed past logging
    if args.command == "steps":
        for step in STEPS.values():
            takes = f" [--param {', '.join(step.params)}]" if step.params else ""
            sys.stdout.write(f"{step.name:<20} {step.help}{takes}\n")
        return 0
    os.environ[THREADS_ENV] = str(args.threads)
    apply_torch_threads()
    writes_home = args.command != "recommend" and not {"-h", "--help"} & set(forwarded)
    try:  # recommend writes nothing, and may read only remote stores
        if writes_home:
            Settings.from_env().check_home()
    except ValueError as err:
        log.error("%s", err)
        return 2
    if args.command == "evaluate":
        from pipelines.evaluation import main as evaluate

        return evaluate(forwarded, prog="hisam evaluate")
    from pipelines.steps import StepSkipped, error_text, run_step, step_errors
    from spark_jobs.quality.report import DataQualityError  # plain Python, no Spark

    try:
        if args.command == "run":
            summary = run_step(args.step, args.logical_date, args.config, dict(args.param))
        elif args.command == "rollback":
            summary = run_step("rollback", dt.datetime.now(dt.UTC).date(), args.config)
        elif args.command == "recommend":
            params = {"user": args.user, "top_k": str(args.top_k), "alias": args.alias}
            params["include_seen"] = str(args.include_seen).lower()
            summary = run_step("recommend", dt.datetime.now(dt.UTC).date(), args.config, params)
        else:
            from pipelines.demo import DemoFailed, run_demo

            try:
                summary = run_demo(args.config, args.dataset, args.movielens_dir)
            except DemoFailed as err:  # the failing task's traceback is in the log above
                log.error("%s", err)
                return 1
    except step_errors() as err:
        log.debug("traceback", exc_info=True)
        log.error("%s", redacted(error_text(err)))
        return DATA_QUALITY_EXIT if isinstance(err, DataQualityError) else 2
    except StepSkipped as skipped:
        log.warning("skipped: %s", skipped)
        summary = {"skipped": True, "reason": str(skipped)}
    except Exception as err:
        if not unreachable(err):
            raise
        log.debug("traceback", exc_info=True)
        first = redacted(str(err).strip().splitlines()[0]) if str(err).strip() else type(err).__name__
        log.error(
            "a database or server failed (MLflow tracking URI %s): %s; --log-level DEBUG shows the traceback",
            masked(Settings.from_env().mlflow_tracking_uri),
            first,
        )
        return 1
    sys.stdout.write(json.dumps(summary, indent=2, default=str) + "\n")
    if summary.get("refreshed") is False:  # a rollback that stands, but whose refresh failed
        log.error("rolled back, but not refreshed: %s", summary.get("refresh_error"))
        return 3
    return 0


def unreachable(err: BaseException) -> bool:
    """Whether ``err`` (or one it was raised from, or one an MLflow error was raised while handling) is
    a database or HTTP client's failed connection: an infrastructure problem whose one-line cause says
    more than 200 lines of stack."""
    seen: BaseException | None = err
    visited: set[int] = set()
    while seen is not None and id(seen) not in visited:
        visited.add(id(seen))
        kind = type(seen)
        client = kind.__name__ in CONNECTION_ERRORS and kind.__module__.split(".")[0] in CLIENT_PACKAGES
        said = kind.__name__ != "OperationalError" or any(w in str(seen).lower() for w in CONNECTION_WORDS)
        if client and said:
            return True
        # MLflow's REST client raises its own error inside the handler, without ``from``: followed for
        # MLflow's errors only, so a bug in another handler keeps its traceback
        handled = kind.__module__.split(".")[0] == "mlflow" and not seen.__suppress_context__
        seen = seen.__cause__ or (seen.__context__ if handled else None)
    return False


if __name__ == "__main__":
    raise SystemExit(main())
