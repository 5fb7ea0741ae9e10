"""Every setting of every command, declared once (see `shared.settings`).

The sections are the TOML tables of a config file and the groups of each
command's `--help`; `COMMANDS` says which settings each command takes. A run
directory's `config.toml` holds the resolved sections and can be fed back
with `--config`.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from typing import TYPE_CHECKING, Any

from shared import settings
from shared.errors import UsageError
from shared.settings import setting

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

SOURCES = ("default", "emnist")
PARTITIONS = ("natural", "iid", "dirichlet")
MODELS = ("linear", "cnn")
TASKS = ("none", "emnist62", "cifar100", "shakespeare", "stackoverflow-words", "stackoverflow-tags")
"""TFF's baseline tasks (`coordinator.tasks`, docs/tasks.md); none: fedcompose's own model."""
SHARD_CHECKS = ("full", "quick")
BENCH_CURVES = ("memory", "scale")
BENCH_SYSTEMS = (
    "keras",
    "tff_local",
    "fedcompose",
    "fedcompose_tls",
    "fedcompose_stratified",
    "fedcompose_unfused",
    "client_loop",
)
BENCH_NAMED_ONLY = ("fedcompose_stratified", "fedcompose_unfused", "client_loop")
"""Systems measured only when `--systems` names them."""
NON_FINITE_POLICIES = ("fail", "drop")
UNIFORM, STRATIFIED = "uniform", "stratified"
SAMPLINGS = (UNIFORM, STRATIFIED)

# The learning algorithm's four building blocks and the parameters each choice
# takes (coordinator/algorithm/ maps every name to TFF's own constructors).
DISTRIBUTORS = ("broadcast",)
CLIENT_WORKS = ("clipped", "model_delta")
OPTIMIZERS = ("sgd", "sgdm", "adam", "yogi", "adagrad")
OPTIMIZER_PARAMETERS: dict[str, tuple[str, ...]] = {
    "sgd": (),
    "sgdm": ("momentum",),
    "adam": ("beta_1", "beta_2", "epsilon"),
    "yogi": ("beta_1", "beta_2", "epsilon", "initial_accumulator"),
    "adagrad": ("epsilon", "initial_accumulator"),
}
"""Optimizer parameters, as `client_<name>` / `server_<name>` settings."""
AGGREGATORS = ("mean", "robust", "compression", "dp_fixed", "dp_adaptive", "secure")
_ROBUST = ("zeroing", "zeroing_norm", "clipping", "clipping_norm")
_DP = ("zeroing", "zeroing_norm", "noise_multiplier", "dp_clip_norm", "dp_delta")
AGGREGATOR_PARAMETERS: dict[str, tuple[str, ...]] = {
    "mean": ("weighting",),
    "robust": ("weighting", *_ROBUST),
    "compression": (
        "weighting",
        *_ROBUST,
        "quantization_bits",
        "quantization_threshold",
        "quantization_rounding",
    ),
    "dp_fixed": _DP,
    "dp_adaptive": (*_DP, "dp_target_quantile", "dp_clip_learning_rate"),
    "secure": (),
}
REFUSED_AGGREGATORS = {
    "secure": "TFF's secure sum (federated_secure_sum_bitwidth) cannot be split into the "
    "mergeable form that runs a round across workers: TFF's compiler leaves it in "
    "after_merge, where it would need every client at once; use --aggregator mean, robust, "
    "compression, dp_fixed or dp_adaptive",
}
"""Aggregators offered by TFF that cannot run across workers, and why (found by
compiling each with `tff.backends.native.compile_to_mergeable_comp_form`)."""
WEIGHTINGS = ("examples", "uniform")
ROUNDINGS = ("stochastic", "deterministic")
MAX_LOCAL_WORKERS = 64
MAX_SECONDS = 1e7
"""Longest wait or deadline (116 days): Python's waits refuse more than about
9.2e9 s, and a run given --round-timeout 1e10 ended in an OverflowError."""
MAX_SEED = 2**32 - 1
"""Shuffle seeds (seed x 1,000,003 + round) travel to the workers as int64; a
seed of 1e13 overflowed there and every worker was reported down."""
MIN_WORKER_MEMORY_MB = 512
DEFAULT_EMNIST_PATH = "~/.tff"
"""Where `tff.simulation.datasets.emnist.load_data` caches the file by default."""


@dataclasses.dataclass
class DataConfig:
    source: str = setting(
        "default",
        "federated dataset to build worker shards from",
        choices=SOURCES,
        fixed_on_resume=True,
    )
    emnist_path: str = setting(
        DEFAULT_EMNIST_PATH,
        "EMNIST: emnist_all.sqlite or a directory holding (or to cache) it",
        fixed_on_resume=True,
        metavar="PATH",
    )
    only_digits: bool = setting(
        True, "EMNIST: digits only (10 classes) instead of all 62 classes", fixed_on_resume=True
    )
    partition: str = setting(
        "natural",
        "natural: whole writers; iid / dirichlet: the same examples re-dealt to as many "
        "synthetic clients, uniformly or with Dirichlet(alpha) label mixes",
        choices=PARTITIONS,
        fixed_on_resume=True,
    )
    alpha: float = setting(
        0.5,
        "Dirichlet concentration for --partition dirichlet (lower: more label skew)",
        above=0,
        fixed_on_resume=True,
    )
    writers: int = setting(
        60, "synthetic writers of the default source", minimum=1, fixed_on_resume=True
    )
    data_seed: int = setting(
        0, "seed of the data split and partition", minimum=0, fixed_on_resume=True
    )
    shards_dir: str = setting(
        "",
        "directory of shard-NNN directories: `data` writes it, `run` serves it (run default: "
        "build shards inside the run directory)",
        metavar="DIR",
    )
    force: bool = setting(False, "replace the shards in a non-empty --shards-dir")
    from_sqlite: str = setting(
        "",
        "data: build from a TFF SQLite client-data file instead of --source (EMNIST, "
        "CIFAR-100, Shakespeare, Stack Overflow, or save_to_sql_client_data output)",
        metavar="PATH",
    )
    sqlite_splits: str = setting(
        "",
        "--from-sqlite: the training split and, after a comma, the test split "
        "(default: train,test, or the only split)",
        metavar="TRAIN[,TEST]",
    )
    from_table: str = setting(
        "",
        "data: build from a table, one row per example, with a client-id column "
        "(.npz, .csv, .parquet; a 'split' column of train/test marks held-out rows)",
        metavar="PATH",
    )
    client_id_column: str = setting("client_id", "--from-table: the client-id column")
    label_key: str = setting(
        "",
        "--from-sqlite/--from-table: the integer label field (needed by --partition "
        "dirichlet; checked by the shard check)",
    )


@dataclasses.dataclass
class FederationConfig:
    workers: int = setting(3, "number of workers (one shard each)", minimum=1)
    addresses: list = setting(
        [], "worker addresses host:port, comma separated", metavar="HOST:PORT,..."
    )
    base_port: int = setting(
        0, "first port for local workers; 0 picks free ports", minimum=0, maximum=65535
    )
    rpc_timeout: float = setting(
        600.0,
        "deadline in seconds for any one call to a worker",
        above=0,
        maximum=MAX_SECONDS,
    )
    connect_timeout: float = setting(
        30.0, "seconds to wait for every worker to be reachable", above=0, maximum=MAX_SECONDS
    )
    worker_memory_mb: int = setting(
        2048,
        "memory budget of each worker's executor service, MB: a worker's share of a round "
        "or an evaluation that would take more runs as several calls that the worker merges "
        "itself (0: no budget, one call per worker)",
        minimum=0,
        metavar="MB",
    )


@dataclasses.dataclass
class ResilienceConfig:
    """What a run does when workers fail, stall or come back (docs/failures.md)."""

    round_timeout: float = setting(
        300.0,
        "seconds a round's workers have to deliver their partial aggregates (and then the "
        "finisher to merge and finish them); a worker not done by then is dropped from the "
        "round like a failed one",
        above=0,
        maximum=MAX_SECONDS,
    )
    min_coverage: float = setting(
        0.5,
        "share of --clients-per-round whose updates a round must include to be applied; a "
        "round that lost more (with its workers) is retried on the workers that are up",
        above=0,
        maximum=1,
    )
    round_retries: int = setting(
        3,
        "times a round that fell short of --min-coverage is retried before the run stops",
        minimum=0,
    )
    retry_wait: float = setting(
        5.0,
        "seconds to wait before retrying a round, for down workers to come back (a worker "
        "that rejoins ends the wait)",
        minimum=0,
        maximum=MAX_SECONDS,
    )
    outage_wait: float = setting(
        900.0,
        "seconds a run waits for workers to return when too few are up to run a round (say, "
        "every one is cut off), probing them, before it stops; --round-timeout only cuts "
        "stragglers short",
        minimum=0,
        maximum=MAX_SECONDS,
    )
    probe_interval: float = setting(
        1.0,
        "seconds before the first probe of a worker that went down; doubles per probe",
        above=0,
        maximum=MAX_SECONDS,
    )
    probe_interval_max: float = setting(
        30.0,
        "longest wait in seconds between two probes of a down worker",
        above=0,
        maximum=MAX_SECONDS,
    )
    worker_restarts: int = setting(
        5, "run: times each local worker that crashed is restarted (0: never)", minimum=0
    )
    restart_backoff: float = setting(
        1.0,
        "run: seconds before restarting a crashed local worker; doubles with each restart of "
        "it, up to 30",
        minimum=0,
        maximum=MAX_SECONDS,
    )


@dataclasses.dataclass
class WorkerConfig:
    shard: str = setting("", "shard directory made by `fedcompose data`", metavar="DIR")
    port: int = setting(10000, "port to serve on", minimum=1, maximum=65535)
    log_file: str = setting("", "also write the worker's log to this file", metavar="FILE")
    shard_check: str = setting(
        "full",
        "how a worker checks its shard at start: full reads every example (checksums, pixel "
        "and label ranges); quick checks sizes and that each file opens",
        choices=SHARD_CHECKS,
    )
    ready_timeout: float = setting(
        120.0,
        "seconds to wait for a worker's executor service to come up",
        above=0,
        maximum=MAX_SECONDS,
    )
    max_message_mb: int = setting(
        2000, "gRPC message size limit of the executor service, MB", minimum=1, maximum=2047
    )


@dataclasses.dataclass
class ModelConfig:
    model: str = setting(
        "linear",
        "linear: the tutorial's dense softmax; cnn: the EMNIST baseline CNN",
        choices=MODELS,
        fixed_on_resume=True,
    )
    task: str = setting(
        "none",
        "a TFF baseline task (docs/tasks.md): its preprocessing (run on the workers) and "
        "model, trained with TFF's weighted FedAvg, server --server-optimizer sgd (FedAvg) or "
        "adam (FedAdam); with `data`, write the task's generated stand-in shards",
        choices=TASKS,
        fixed_on_resume=True,
    )
    task_model: str = setting(
        "",
        "--task's model variant (emnist62: cnn_dropout, cnn, 2nn; cifar100: resnet18 ... "
        "resnet152; default: the paper's)",
        fixed_on_resume=True,
        metavar="NAME",
    )
    task_vocab: str = setting(
        "",
        "--task stackoverflow-*: directory of TFF's stackoverflow.word_count and "
        "stackoverflow.tag_count (default: counted from the stand-in)",
        fixed_on_resume=True,
        metavar="DIR",
    )


@dataclasses.dataclass
class TrainingConfig:
    rounds: int = setting(30, "number of training rounds", minimum=1)
    clients_per_round: int = setting(
        10, "clients sampled (without replacement) per round", minimum=1, fixed_on_resume=True
    )
    client_learning_rate: float = setting(
        0.3, "client optimizer's learning rate", above=0, fixed_on_resume=True
    )
    server_learning_rate: float = setting(
        1.0,
        "server optimizer's learning rate (finalizer)",
        above=0,
        fixed_on_resume=True,
    )
    batch_size: int = setting(20, "client batch size", minimum=1, fixed_on_resume=True)
    local_epochs: int = setting(
        1, "passes over its data per client per round", minimum=1, fixed_on_resume=True
    )
    clip_norm: float = setting(
        1.0, "global L2 norm each client gradient is clipped to", above=0, fixed_on_resume=True
    )
    shuffle_buffer: int = setting(
        100,
        "client-side shuffle buffer (1 disables shuffling)",
        minimum=1,
        # TensorFlow allocates the whole buffer for every client dataset: at 2**62
        # each worker's executor aborted (std::length_error) and the run blamed
        # the workers; 1e5 is more than any client holds, at 2.4 MB a dataset.
        maximum=100_000,
        fixed_on_resume=True,
    )
    seed: int = setting(
        0,
        "seed of client sampling and shuffling",
        minimum=0,
        maximum=MAX_SEED,
        fixed_on_resume=True,
    )
    sampling: str = setting(
        UNIFORM,
        "how a round's clients are drawn: uniform: TFF's uniform draw without replacement "
        "from all clients; stratified: from each worker's clients separately, each worker "
        "giving a share proportional to the clients it hosts, rounded down or up at random "
        "(even shares, so no worker waits on a share larger by chance; each client is "
        "still drawn with probability clients per round over clients)",
        choices=SAMPLINGS,
        fixed_on_resume=True,
    )
    on_non_finite: str = setting(
        "fail",
        "a client's update or loss, the aggregate, the model or a held-out figure that is "
        "not finite (NaN/inf): fail stops the run naming the client; drop leaves such "
        "clients out of the round (and out of the figures), says which, and goes on",
        choices=NON_FINITE_POLICIES,
    )


@dataclasses.dataclass
class AlgorithmConfig:
    """The learning algorithm's four blocks (`fedcompose blocks` lists them).

    The learning rates, the client gradient clip norm and local epochs stay in
    [training], where they were before the blocks became choices.
    """

    distributor: str = setting(
        "broadcast",
        "distributor block: broadcast sends the server model to every sampled client "
        "(tff.learning.templates.build_broadcast_process)",
        choices=DISTRIBUTORS,
        fixed_on_resume=True,
    )
    client_work: str = setting(
        "clipped",
        "client work block: clipped = the tutorial's local training with every gradient "
        "clipped to --clip-norm; model_delta = TFF's model-delta client work, unclipped "
        "(as in build_weighted_fed_avg / build_weighted_fed_prox)",
        choices=CLIENT_WORKS,
        fixed_on_resume=True,
    )
    client_optimizer: str = setting(
        "sgd",
        "client optimizer (tff.learning.optimizers.build_*) at --client-learning-rate",
        choices=OPTIMIZERS,
        fixed_on_resume=True,
    )
    client_momentum: float = setting(
        0.9, "client sgdm momentum", minimum=0, below=1, fixed_on_resume=True
    )
    client_beta_1: float = setting(
        0.9, "client adam/yogi first-moment decay", minimum=0, below=1, fixed_on_resume=True
    )
    client_beta_2: float = setting(
        0.99, "client adam/yogi second-moment decay", minimum=0, below=1, fixed_on_resume=True
    )
    client_epsilon: float = setting(
        1e-3,
        "client adam/yogi/adagrad epsilon (tau of Reddi et al. 2021)",
        above=0,
        maximum=1e3,
        fixed_on_resume=True,
    )
    client_initial_accumulator: float = setting(
        1e-6,
        "client yogi/adagrad initial second-moment (preconditioner) value",
        minimum=0,
        maximum=1e3,
        fixed_on_resume=True,
    )
    proximal_mu: float = setting(
        0.0,
        "FedProx: strength mu of the proximal term mu/2 |w - w_server|^2 added to every "
        "client's loss (0: none)",
        minimum=0,
        maximum=1e3,
        fixed_on_resume=True,
    )
    aggregator: str = setting(
        "mean",
        "aggregator block: mean; robust (adaptive zeroing and clipping, "
        "tff.learning.robust_aggregator); compression (quantized sum, "
        "tff.learning.compression_aggregator); dp_fixed / dp_adaptive (Gaussian DP with fixed "
        "or adaptive clipping, tff.aggregators.DifferentiallyPrivateFactory); secure (refused: "
        "cannot run across workers)",
        choices=AGGREGATORS,
        fixed_on_resume=True,
    )
    weighting: str = setting(
        "examples",
        "mean/robust/compression: weight each client by its examples, or all alike "
        "(uniform; DP aggregators are always uniform)",
        choices=WEIGHTINGS,
        fixed_on_resume=True,
    )
    zeroing: bool = setting(
        True,
        "robust/compression/dp: zero out a client's update whose largest value exceeds "
        "--zeroing-norm (tff.aggregators.zeroing_factory)",
        fixed_on_resume=True,
    )
    zeroing_norm: float = setting(
        0.0,
        "zeroing threshold; 0: adaptive, TFF's estimate (2 x the 0.98 quantile + 1)",
        minimum=0,
        maximum=1e9,
        fixed_on_resume=True,
    )
    clipping: bool = setting(
        True,
        "robust/compression: clip every client's update to --clipping-norm in L2 "
        "(tff.aggregators.clipping_factory)",
        fixed_on_resume=True,
    )
    clipping_norm: float = setting(
        0.0,
        "update clipping norm; 0: adaptive, TFF's estimate of the 0.8 quantile",
        minimum=0,
        maximum=1e9,
        fixed_on_resume=True,
    )
    quantization_bits: int = setting(
        8, "compression: bits per quantized value", minimum=1, maximum=16, fixed_on_resume=True
    )
    quantization_threshold: int = setting(
        20000,
        "compression: only tensors with more than this many values are quantized (TFF's "
        "default; the linear model's largest has 7840)",
        minimum=0,
        fixed_on_resume=True,
    )
    quantization_rounding: str = setting(
        "stochastic",
        "compression: stochastic (unbiased, TFF's default) or deterministic rounding",
        choices=ROUNDINGS,
        fixed_on_resume=True,
    )
    noise_multiplier: float = setting(
        0.5,
        "dp: Gaussian noise stddev over the clip norm (dp_adaptive: the total, "
        "shared with the clip estimate, as TFF defines it)",
        minimum=0,
        maximum=1e3,
        fixed_on_resume=True,
    )
    dp_clip_norm: float = setting(
        0.1,
        "dp_fixed: L2 norm every client's update is clipped to; dp_adaptive: the initial clip norm",
        above=0,
        maximum=1e6,
        fixed_on_resume=True,
    )
    dp_target_quantile: float = setting(
        0.5,
        "dp_adaptive: share of clients whose update the clip norm should leave unclipped",
        above=0,
        below=1,
        fixed_on_resume=True,
    )
    dp_clip_learning_rate: float = setting(
        0.2,
        "dp_adaptive: learning rate of the geometric clip-norm update",
        above=0,
        maximum=10,
        fixed_on_resume=True,
    )
    dp_delta: float = setting(
        1e-5,
        "dp: the delta at which the privacy spent so far is reported as epsilon",
        above=0,
        below=1,
    )
    server_optimizer: str = setting(
        "sgd",
        "finalizer block: server optimizer at --server-learning-rate, applied to the "
        "aggregated update (adam / yogi / adagrad: FedAdam / FedYogi / FedAdagrad)",
        choices=OPTIMIZERS,
        fixed_on_resume=True,
    )
    server_momentum: float = setting(
        0.9, "server sgdm momentum", minimum=0, below=1, fixed_on_resume=True
    )
    server_beta_1: float = setting(
        0.9, "server adam/yogi first-moment decay", minimum=0, below=1, fixed_on_resume=True
    )
    server_beta_2: float = setting(
        0.99, "server adam/yogi second-moment decay", minimum=0, below=1, fixed_on_resume=True
    )
    server_epsilon: float = setting(
        1e-3,
        "server adam/yogi/adagrad epsilon (tau of Reddi et al. 2021)",
        above=0,
        maximum=1e3,
        fixed_on_resume=True,
    )
    server_initial_accumulator: float = setting(
        1e-6,
        "server yogi/adagrad initial second-moment (preconditioner) value",
        minimum=0,
        maximum=1e3,
        fixed_on_resume=True,
    )


@dataclasses.dataclass
class EvaluationConfig:
    eval_every: int = setting(
        5,
        "evaluate on every writer's held-out examples every K rounds (0: only at the end)",
        minimum=0,
    )


@dataclasses.dataclass
class OutputConfig:
    run_dir: str = setting(
        "",
        "directory of this run (config, metrics, checkpoints, plots); default runs/<time> "
        "(bench: bench-results/<time>)",
        metavar="DIR",
    )
    checkpoint_every: int = setting(
        1, "save the server state every N rounds (0: only at the end)", minimum=0
    )
    keep_checkpoints: int = setting(
        3, "how many recent checkpoints to keep (the first is kept too)", minimum=1
    )
    accept_unrecorded_data: bool = setting(
        False,
        "resume a run directory that has checkpoints but no trained_on.json (the record of "
        "the data it was trained on, which every resume is checked against) on whatever data "
        "the workers serve now, and record that",
    )
    json: bool = setting(False, "print one JSON object per line instead of a table")
    verbose: bool = setting(False, "show debug logs and TensorFlow's own output")


@dataclasses.dataclass
class CompareConfig:
    run_dirs: list = setting([], "run directories to compare", metavar="RUN_DIR")
    output: str = setting("comparison.png", "where to write the picture (PNG)", metavar="FILE")


@dataclasses.dataclass
class BenchConfig:
    hosted_clients: int = setting(3400, "synthetic writers hosted across the workers", minimum=1)
    examples_per_client: int = setting(
        24,
        "mean training examples of a synthetic writer (each holds half to 1.5 times as many)",
        minimum=1,
    )
    passes: int = setting(
        1,
        "run the whole grid this many times, every other pass in reverse order of systems, "
        "and take medians over all passes",
        minimum=1,
    )
    skip: list = setting([], "workloads to leave out, as MODEL/CLIENTS (e.g. cnn/1000)")
    systems: list = setting(
        [s for s in BENCH_SYSTEMS if s not in BENCH_NAMED_ONLY],
        "systems to measure: keras (compute floor), tff_local, fedcompose, fedcompose_tls "
        "(workers behind mutual TLS), fedcompose_stratified (--sampling stratified), "
        "fedcompose_unfused (a worker's share of a round as TensorFlow calls per client, "
        "the path before fusing), client_loop (each client's own tf.data dataset and update "
        "in one tf.function in one process, no executor: what the clients' own work costs "
        "under TFF's client-dataset contract); the last three are measured only when named",
    )
    data_cache: str = setting(
        "bench-results/data", "where synthetic shards are built and cached", metavar="DIR"
    )
    quick: bool = setting(
        False,
        "a small grid that finishes in a few minutes; settings given explicitly still apply",
    )
    chaos: bool = setting(
        False,
        "instead of the grid, a soak of a run that loses workers: `run` with the linear model "
        "(--rounds default 200, --workers 3, --clients-per-round 10) while workers are "
        "SIGKILLed and SIGSTOPped every few rounds, and the coordinator once",
    )
    chaos_every: int = setting(6, "chaos soak: mean rounds between two faults", minimum=2)
    pinned: bool = setting(
        False,
        "pin each worker (with its worker_binary) to a core of its own and TFF in one process "
        "and the Keras floor to one core, TensorFlow's thread pools sized to match (the "
        "coordinator stays unpinned): measures what each added worker's core adds",
    )
    curves: list = setting(
        [],
        "instead of the grid, cost curves: memory (the largest worker's peak memory against "
        "--clients-per-round, default cnn 10,100,1000 at --workers 1, with --worker-memory-mb "
        "and without a budget); scale (worker start-up, discovery, rounds, evaluation, "
        "checkpoint and coordinator memory against --scale-hosted clients on 2 workers)",
        metavar="memory,scale",
    )
    scale_hosted: list = setting(
        ["3400", "10000", "30000", "100000"],
        "hosted clients of the scale curve",
        metavar="N,N,...",
    )


@dataclasses.dataclass
class TLSConfig:
    tls_dir: str = setting(
        "",
        "this site's TLS kit made by `fedcompose provision`: a worker serves mutual TLS on "
        "--port with it and lets only the coordinator call; train and status dial workers "
        "with the coordinator's kit",
        metavar="DIR",
    )
    insecure_plaintext_network: bool = setting(
        False,
        "worker: serve --port on EVERY interface WITHOUT TLS OR AUTHENTICATION; anyone who "
        "reaches the port can run code as this user (without this or --tls-dir a worker "
        "listens on loopback only)",
    )
    audit_log: str = setting(
        "",
        "worker: the audit log (every refused connection and every call, rotated at 5 MB, "
        "3 old files kept); default: next to --log-file (NAME.audit.log), else "
        "~/.local/state/fedcompose/worker-PORT.audit.log",
        metavar="FILE",
    )
    handshake_timeout: float = setting(
        10.0,
        "worker: seconds a connection may take to complete mutual TLS before it is closed",
        above=0,
        maximum=300,
    )
    max_pending_handshakes: int = setting(
        64,
        "worker: TLS handshakes in progress at once; one more closes the oldest (a flood of "
        "connections without a certificate cannot lock the coordinator out)",
        minimum=1,
        maximum=10_000,
    )


@dataclasses.dataclass
class ProvisionConfig:
    kits_dir: str = setting(
        "", "directory of the federation's CA and kits (created or extended)", metavar="DIR"
    )
    sites: list = setting(
        [],
        "workers to issue kits for, NAME=ADDRESS[:PORT] (port default 10000), comma "
        "separated; repeat a name to add addresses it is dialled at",
        metavar="NAME=ADDR,...",
    )
    coordinator_name: str = setting(
        "coordinator", "the coordinator's identity (its certificate's common name)"
    )
    valid_days: int = setting(
        365, "days the issued site certificates are valid", minimum=1, maximum=3650
    )
    revoke: list = setting(
        [],
        "sites whose certificates to revoke (comma separated names): adds them to the "
        "federation's revocation list crl.pem, copies it into every kit, and moves the "
        "revoked kits aside (re-issue one with --sites); copy each kit's new crl.pem to its "
        "machine, where workers take it without a restart",
        metavar="NAME,...",
    )


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "federation": FederationConfig,
    "resilience": ResilienceConfig,
    "worker": WorkerConfig,
    "model": ModelConfig,
    "training": TrainingConfig,
    "algorithm": AlgorithmConfig,
    "evaluation": EvaluationConfig,
    "output": OutputConfig,
    "bench": BenchConfig,
    "tls": TLSConfig,
    "provision": ProvisionConfig,
    "compare": CompareConfig,
}
settings.check_unique_names(SECTIONS)

RUN_SECTIONS = (
    "data",
    "federation",
    "resilience",
    "worker",
    "model",
    "training",
    "algorithm",
    "evaluation",
    "output",
    "tls",
)


@dataclasses.dataclass
class RunConfig:
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    federation: FederationConfig = dataclasses.field(default_factory=FederationConfig)
    resilience: ResilienceConfig = dataclasses.field(default_factory=ResilienceConfig)
    worker: WorkerConfig = dataclasses.field(default_factory=WorkerConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    training: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)
    algorithm: AlgorithmConfig = dataclasses.field(default_factory=AlgorithmConfig)
    evaluation: EvaluationConfig = dataclasses.field(default_factory=EvaluationConfig)
    output: OutputConfig = dataclasses.field(default_factory=OutputConfig)
    bench: BenchConfig = dataclasses.field(default_factory=BenchConfig)
    compare: CompareConfig = dataclasses.field(default_factory=CompareConfig)
    tls: TLSConfig = dataclasses.field(default_factory=TLSConfig)
    provision: ProvisionConfig = dataclasses.field(default_factory=ProvisionConfig)
    given: frozenset[str] = frozenset()
    """Names of the settings a flag or the config file gave (the rest are defaults)."""
    flagged: frozenset[str] = frozenset()
    """Names of the settings a command-line flag gave."""

    def to_dict(self, sections: tuple[str, ...] = RUN_SECTIONS) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in sections}

    def to_toml(self) -> str:
        return settings.to_toml(
            self.to_dict(), "fedcompose run configuration (resolved: defaults, config file, flags)"
        )


_TRAINING = ("model", "training", "algorithm", "evaluation")
_COORDINATOR_RESILIENCE = tuple(
    f.name
    for f in dataclasses.fields(ResilienceConfig)
    if f.name not in ("worker_restarts", "restart_backoff")
)
_PER_PROCESS = ("shard", "port", "log_file")
_OWN_DATA = ("from_sqlite", "sqlite_splits", "from_table", "client_id_column", "label_key")
"""`fedcompose data` builds shards of any structure from these; `run` trains the
built-in models, which take EMNIST-shaped data only."""
_DATA_COMMAND_ONLY = ("force", *_OWN_DATA)
_RUN_OUTPUT = (
    "run_dir",
    "checkpoint_every",
    "keep_checkpoints",
    "accept_unrecorded_data",
    "verbose",
)
COMMANDS: dict[str, settings.Command] = {
    "run": settings.Command(
        "run",
        {
            "data": tuple(
                f.name for f in dataclasses.fields(DataConfig) if f.name not in _DATA_COMMAND_ONLY
            ),
            "federation": (
                "workers",
                "base_port",
                "rpc_timeout",
                "connect_timeout",
                "worker_memory_mb",
            ),
            "resilience": "*",
            "worker": tuple(
                f.name for f in dataclasses.fields(WorkerConfig) if f.name not in _PER_PROCESS
            ),
            **{s: "*" for s in _TRAINING},
            "output": _RUN_OUTPUT,
        },
    ),
    "train": settings.Command(
        "train",
        {
            "federation": ("addresses", "rpc_timeout", "connect_timeout", "worker_memory_mb"),
            "resilience": _COORDINATOR_RESILIENCE,
            "tls": ("tls_dir",),
            **{s: "*" for s in _TRAINING},
            "output": _RUN_OUTPUT,
        },
        required=frozenset({"addresses"}),
    ),
    "data": settings.Command(
        "data",
        {"data": "*", "model": ("task",), "federation": ("workers",), "output": ("verbose",)},
        required=frozenset({"shards_dir"}),
    ),
    "worker": settings.Command(
        "worker",
        {"worker": "*", "tls": "*", "output": ("verbose",)},
        required=frozenset({"shard"}),
    ),
    "status": settings.Command(
        "status",
        {
            "federation": ("addresses", "connect_timeout"),
            "tls": ("tls_dir",),
            "output": ("run_dir", "json", "verbose"),
        },
        defaults={"connect_timeout": 10.0},
    ),
    "provision": settings.Command(
        "provision",
        {"provision": "*", "output": ("verbose",)},
        required=frozenset({"kits_dir"}),
    ),
    "bench": settings.Command(
        "bench",
        {
            "model": ("model",),
            "training": (
                "clients_per_round",
                "rounds",
                "batch_size",
                "local_epochs",
                "client_learning_rate",
                "seed",
            ),
            "federation": ("workers", "rpc_timeout", "worker_memory_mb"),
            "resilience": ("round_timeout",),
            "data": ("data_seed",),
            "bench": "*",
            "output": ("run_dir", "verbose"),
        },
        sweep=frozenset({"model", "clients_per_round", "workers"}),
        defaults={
            "model": ["linear", "cnn"],
            "clients_per_round": [10, 100, 1000],
            "workers": [1, 2, 4],
            "rounds": 3,
            "rpc_timeout": 1800.0,
            "round_timeout": 3.0,
        },
    ),
    "compare": settings.Command(
        "compare",
        {"compare": "*", "output": ("verbose",)},
        required=frozenset({"run_dirs"}),
        positional="run_dirs",
    ),
    "blocks": settings.Command("blocks", {}, accepts_config_file=False),
}


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    settings.add_arguments(parser, COMMANDS[command], SECTIONS)


_ADDRESS = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


def resolve(args: argparse.Namespace, command: str) -> RunConfig:
    """The command's settings: defaults < config file < flags, all checked."""
    config: RunConfig = settings.resolve(args, COMMANDS[command], SECTIONS, RunConfig)
    _check_together(config, command)
    return config


def _not_default(section: DataclassInstance) -> set[str]:
    """Names of the section's settings set to something other than their default.

    "Given" is not enough: a resolved config.toml fed back with --config holds
    every setting, most at their defaults.
    """
    return {
        f.name
        for f in dataclasses.fields(section)
        if getattr(section, f.name) != settings.field_default(f)
    }


def _applies_only(name: str, kind: str, chosen: str, table: dict[str, tuple[str, ...]]) -> str:
    takers = [choice for choice, params in table.items() if name in params]
    return (
        f"{settings.flag(name)} applies to {settings.flag(kind)} {' / '.join(takers)} "
        f"only, not {chosen}"
    )


def _check_aggregator_parameters(a: AlgorithmConfig, changed: set[str]) -> None:
    """An aggregator parameter set must belong to the chosen aggregator."""
    aggregator_params = {p for params in AGGREGATOR_PARAMETERS.values() for p in params}
    dp = a.aggregator.startswith("dp_")
    for name in sorted(changed & aggregator_params):
        if name == "weighting" and dp and a.weighting == "uniform":
            continue  # what DP aggregators are; a resolved config.toml says so
        if name not in AGGREGATOR_PARAMETERS[a.aggregator]:
            raise UsageError(_applies_only(name, "aggregator", a.aggregator, AGGREGATOR_PARAMETERS))


def _check_optimizer_parameters(a: AlgorithmConfig, changed: set[str]) -> None:
    """An optimizer parameter set must belong to its side's chosen optimizer."""
    for side in ("client", "server"):
        chosen = getattr(a, f"{side}_optimizer")
        for param in sorted({p for ps in OPTIMIZER_PARAMETERS.values() for p in ps}):
            name = f"{side}_{param}"
            if name in changed and param not in OPTIMIZER_PARAMETERS[chosen]:
                takers = [o for o, ps in OPTIMIZER_PARAMETERS.items() if param in ps]
                raise UsageError(
                    f"{settings.flag(name)} applies to --{side}-optimizer "
                    f"{' / '.join(takers)} only, not {chosen}"
                )


def _check_algorithm(config: RunConfig) -> None:
    """Every block parameter must belong to the chosen block; combinations that
    cannot run across workers are refused here, before anything starts."""
    a, t = config.algorithm, config.training
    # Set to something other than its default, or by a flag even to its default
    # (`--aggregator mean --noise-multiplier 0.5` is refused too); a config
    # file's values count only where they differ, as a resolved config.toml
    # fed back with --config holds every setting.
    changed = _not_default(a) | config.flagged
    if a.aggregator in REFUSED_AGGREGATORS:
        raise UsageError(f"--aggregator {a.aggregator}: {REFUSED_AGGREGATORS[a.aggregator]}")
    dp = a.aggregator.startswith("dp_")
    _check_aggregator_parameters(a, changed)
    _check_optimizer_parameters(a, changed)
    if a.client_work != "clipped" and "clip_norm" in _not_default(t) | config.flagged:
        raise UsageError(
            f"--clip-norm applies to --client-work clipped only; {a.client_work} does not "
            "clip gradients"
        )
    if not a.zeroing and "zeroing_norm" in changed:
        raise UsageError("--zeroing-norm needs --zeroing")
    if not a.clipping and "clipping_norm" in changed:
        raise UsageError("--clipping-norm needs --clipping")
    if dp and t.sampling == STRATIFIED:
        raise UsageError(
            f"--sampling stratified with --aggregator {a.aggregator}: the privacy accounting "
            "covers uniform sampling only (stratified sampling draws the clients of one worker "
            "together less or more often than uniform sampling); use --sampling uniform"
        )
    if dp:
        # TFF's DP factories are unweighted: every sampled client counts once.
        a.weighting = "uniform"
    # TFF spends noise of stddev 0.05 x clients per round on the clipped count
    # and refuses a total noise multiplier it cannot reach that way
    # (DifferentiallyPrivateFactory.gaussian_adaptive).
    if (
        a.aggregator == "dp_adaptive"
        and a.noise_multiplier > 0
        and a.noise_multiplier >= 0.1 * t.clients_per_round
    ):
        raise UsageError(
            f"--noise-multiplier {a.noise_multiplier:g} with --aggregator dp_adaptive "
            f"needs more than {10 * a.noise_multiplier:g} clients per round (TFF adds "
            "noise of stddev 0.05 x clients per round to the clip estimate's count); "
            "raise --clients-per-round, lower --noise-multiplier or use dp_fixed"
        )


_TASK_ALGORITHM = {"server_optimizer", "server_beta_1", "server_beta_2", "server_epsilon"}
"""Algorithm settings a --task run takes: its process is TFF's weighted FedAvg
with client SGD, whose server optimizer is the one choice."""


def _check_task(config: RunConfig, command: str) -> None:
    m, a, d = config.model, config.algorithm, config.data
    if m.task != "none" and (d.from_sqlite or d.from_table):
        raise UsageError(
            f"--task {m.task} writes the task's stand-in; --from-sqlite / --from-table build "
            "shards of your own data (train on them with --task and --shards-dir)"
        )
    if command not in ("run", "train"):
        return
    if m.task == "none":
        for name in ("task_model", "task_vocab"):
            if getattr(m, name):
                raise UsageError(f"{settings.flag(name)} applies with --task only")
        return
    if "model" in _not_default(m) | config.flagged:
        raise UsageError(f"--model does not apply with --task {m.task}: the task has its model")
    if a.server_optimizer not in ("sgd", "adam"):
        raise UsageError(
            f"--task trains FedAvg (--server-optimizer sgd) or FedAdam (adam), not "
            f"{a.server_optimizer}"
        )
    changed = (_not_default(a) | (config.flagged & {f.name for f in dataclasses.fields(a)})) - (
        _TASK_ALGORITHM
    )
    if "clip_norm" in _not_default(config.training) | config.flagged:
        changed.add("clip_norm")
    if changed:
        raise UsageError(
            f"{', '.join(settings.flag(n) for n in sorted(changed))} do(es) not apply with "
            f"--task: its process is TFF's weighted FedAvg (client SGD, mean aggregation); "
            "choose --server-optimizer sgd or adam"
        )
    if m.task_vocab and not m.task.startswith("stackoverflow"):
        raise UsageError(f"--task-vocab applies to the Stack Overflow tasks only, not {m.task}")


def _check_together(config: RunConfig, command: str) -> None:
    """Rules that involve more than one setting."""
    if command in ("run", "train"):
        _check_algorithm(config)
    _check_task(config, command)
    _check_federation(config, command)
    _check_data(config, command)


def _check_federation(config: RunConfig, command: str) -> None:
    """Workers, ports, addresses and TLS, together."""
    f = config.federation
    if command == "run" and f.workers > MAX_LOCAL_WORKERS:
        raise UsageError(f"--workers must be <= {MAX_LOCAL_WORKERS} on one machine")
    if 0 < f.worker_memory_mb < MIN_WORKER_MEMORY_MB:
        raise UsageError(
            f"--worker-memory-mb {f.worker_memory_mb} is less than a worker's executor service "
            f"needs with a model loaded; use at least {MIN_WORKER_MEMORY_MB} (or 0: no budget)"
        )
    if command == "run" and f.base_port and f.base_port + f.workers - 1 > 65535:
        raise UsageError(
            f"--base-port {f.base_port} with {f.workers} workers runs past port 65535; "
            "use 0 (pick free ports) or a lower port"
        )
    if config.tls.tls_dir and config.tls.insecure_plaintext_network:
        raise UsageError(
            "--tls-dir and --insecure-plaintext-network exclude each other; "
            "serve TLS with the kit, or plaintext without it"
        )
    for address in f.addresses:
        match = _ADDRESS.match(address)
        if not match or not 0 < int(match.group(2)) < 65536:
            raise UsageError(f"--addresses: {address!r} is not host:port")
    if len(set(f.addresses)) != len(f.addresses):
        dup = next(a for a in f.addresses if f.addresses.count(a) > 1)
        raise UsageError(f"--addresses: {dup} is listed twice")


def _check_data(config: RunConfig, command: str) -> None:
    """Data settings against the source, the shards and the workers."""
    d = config.data
    # Set to something other than its default (a resolved config.toml fed back
    # with --config holds every setting, most at their defaults).
    given = {
        f.name
        for f in dataclasses.fields(DataConfig)
        if getattr(d, f.name) != settings.field_default(f)
    }
    _check_own_data(d, given, command)
    if command in ("run", "data"):
        _check_data_source(d, given)
    if command == "run" and d.shards_dir:
        built = (
            "source",
            "partition",
            "writers",
            "data_seed",
            "alpha",
            "only_digits",
            "emnist_path",
        )
        for name in built:
            if name in given:
                raise UsageError(
                    f"{settings.flag(name)} does not apply with --shards-dir: the shards "
                    "there were built already (their manifests say how)"
                )
    uses_default_data = config.model.task == "none" and _builds_from_source(command, d)
    if uses_default_data and d.source == "default":
        _check_default_data_fits(config, command)


def _check_data_source(d: DataConfig, given: set[str]) -> None:
    """Settings that belong to one source or partition only."""
    if "alpha" in given and d.partition != "dirichlet":
        raise UsageError(f"--alpha applies to --partition dirichlet only, not {d.partition}")
    if "writers" in given and d.source != "default":
        raise UsageError("--writers applies to --source default only; EMNIST has its writers")
    if "emnist_path" in given and d.source != "emnist":
        raise UsageError("--emnist-path applies to --source emnist only")
    if not d.only_digits and d.source != "emnist":
        raise UsageError("--no-only-digits needs --source emnist; the default has digits only")


def _check_default_data_fits(config: RunConfig, command: str) -> None:
    """The default data's writers against the workers and clients per round."""
    d, f, t = config.data, config.federation, config.training
    if f.workers > d.writers:
        raise UsageError(
            f"--workers {f.workers} is more than the {d.writers} writers of the data; "
            "every worker needs at least one; use fewer --workers or more --writers"
        )
    if command == "run" and t.clients_per_round > d.writers:
        raise UsageError(
            f"--clients-per-round {t.clients_per_round} is more than the {d.writers} "
            "writers of the default data; lower it or raise --writers"
        )


def _builds_from_source(command: str, d: DataConfig) -> bool:
    """Whether the command builds shards from --source (not --shards-dir, nor own data)."""
    if command == "data":
        return not (d.from_sqlite or d.from_table)
    return command == "run" and not d.shards_dir


def _check_own_data(d: DataConfig, given: set[str], command: str) -> None:
    if command != "data":
        return  # the other commands do not take these settings
    if d.from_sqlite and d.from_table:
        raise UsageError("--from-sqlite and --from-table: give one source of data, not both")
    own = d.from_sqlite or d.from_table
    if own:
        for name in ("source", "emnist_path", "writers", "only_digits"):
            if name in given:
                raise UsageError(
                    f"{settings.flag(name)} does not apply with "
                    f"{'--from-sqlite' if d.from_sqlite else '--from-table'}"
                )
        if d.partition == "dirichlet" and not d.label_key:
            raise UsageError("--partition dirichlet deals by label: give --label-key FIELD")
        return
    for name in _OWN_DATA:
        if name in given:
            raise UsageError(f"{settings.flag(name)} applies to --from-sqlite or --from-table only")


def resume_conflicts(
    saved: dict[str, dict[str, Any]], current: RunConfig, names: set[str] | None = None
) -> list[str]:
    """Settings that must not change when a run is resumed, and did (among
    `names`, if given: the settings the resuming command takes)."""
    conflicts = []
    for section in RUN_SECTIONS:
        cls = SECTIONS[section]
        now = dataclasses.asdict(getattr(current, section))
        table = saved.get(section)
        for f in dataclasses.fields(cls):
            if not f.metadata.get("fixed_on_resume") or (names is not None and f.name not in names):
                continue
            before = table.get(f.name) if isinstance(table, dict) else None
            if before is not None and before != now[f.name]:
                conflicts.append(f"{section}.{f.name}: {before!r} -> {now[f.name]!r}")
    return conflicts
