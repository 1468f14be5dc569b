"""The placement toolkit's files: speed (``profile``), quality (``evaluate``), surrogate fit (``fit``), presets
(``frontier``), speculative acceptance (``acceptance``).

Pydantic models at the file boundary only (``extra="forbid"``, every field described); policy code gets
frozen values from them (``policies.cost.SpeedModel``, ``policies.surrogate.ClusterExpansion``). Every file
starts with ``format`` and ``version``, checked first, and carries a ``Fingerprint`` of the model and device
it was measured on. A faulty file is refused with ``TableMismatch`` naming the file, the field and the fault.
Formats: docs/tables.md.
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from policies.cost import SpeedModel, check_grid
from policies.errors import ConfigError, InvalidPlacement, TableMismatch
from policies.placement import MIXERS, Placement

MIXER_NAMES: tuple[str, ...] = tuple(m.value for m in MIXERS)
Ms = Annotated[float, Field(ge=0)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Fingerprint(_Model):
    device: str = Field(description="where it was measured: 'cuda: NVIDIA H100 80GB HBM3', 'cpu: <model name>'")
    model: str = Field(description="checkpoint folder name, or 'shape:<name>' for a random-weight model of that shape")
    model_sha256: str = Field(description="sha256 of config.json plus the names and sizes of the weight files")
    num_layers: int = Field(ge=1, description="decoder layers of the model")
    dtype: str = Field(description="torch dtype of weights and activations, e.g. 'bfloat16'")
    created: str = Field(description="when the file was written, ISO 8601 in UTC")
    software: str = Field(description="what produced the file, e.g. 'supernet-router 0.1.0, torch 2.13.0'")


def utc_now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


class AttentionShapeEntry(_Model):
    kind: Literal["attention"] = Field(description="full or sliding-window attention")
    kv_heads: int = Field(ge=1, description="key/value heads")
    head_size: int = Field(ge=1, description="dimension per head")
    window: int | None = Field(None, ge=1, description="sliding window in tokens; null for full attention")


class DeltaRuleShapeEntry(_Model):
    kind: Literal["delta_rule"] = Field(description="GDN or KDA")
    heads: int = Field(ge=1, description="recurrent state heads")
    key_dim: int = Field(ge=1, description="state rows per head")
    value_dim: int = Field(ge=1, description="state columns per head")
    conv_channels: int = Field(ge=1, description="channels of the short convolution(s)")
    conv_kernel: int = Field(ge=1, description="short convolution kernel size")


ShapeEntry = Annotated[AttentionShapeEntry | DeltaRuleShapeEntry, Field(discriminator="kind")]


class MemoryEntry(_Model):
    kv_bytes: int = Field(ge=1, description="bytes per cached key, value or conv input (the model dtype)")
    state_bytes: int = Field(ge=1, description="bytes per recurrent state element (fp32: 4)")
    page_tokens: int | None = Field(None, ge=1, description="tokens per attention page of the engine's cache "
                                    "pool; absent (tables before pages): derived from the shapes, as the engine does")
    layers: list[dict[str, ShapeEntry]] = Field(description="per layer: mixer name -> cache shape")


class Measurement(_Model):
    warmup: int = Field(ge=0, description="untimed runs before each grid point")
    repeats: int = Field(ge=1, description="timed runs per grid point; the median is kept")
    cache_fill: str = Field(description="how caches were filled to each context before timing")
    monotone: bool = Field(description="true: grids are the running maximum of the medians along each axis")
    other_cpus: float | None = Field(None, ge=0, description="CPUs kept busy by other processes while profiling, "
                                     "averaged (Linux /proc/stat); above BUSY_CPUS the times are slower than the "
                                     "machine's own; null where it could not be measured (or older tables)")
    decode_timing: str | None = Field(None, description="how decode steps and the shared layers were timed "
                                      "(workers.profiling.DECODE_TIMING); null: one layer timed alone (older tables)")


# Other processes' mean CPU use above which a CPU profile is not trusted as this machine's speed.
BUSY_CPUS = 0.5


class SpeedFile(_Model):
    format: Literal["supernet-router/speed"] = Field(description="file kind")
    version: Literal[1] = Field(description="format version")
    fingerprint: Fingerprint = Field(description="model and device the times were measured on")
    batches: list[int] = Field(description="decode grid: batch sizes (rows in one group), increasing")
    contexts: list[int] = Field(description="decode grid: tokens already cached per row, increasing")
    decode_ms: dict[str, list[list[Ms | None]]] = Field(
        description="mixer -> [batch][context]: ms for one layer's mixer to run one decode step of the group")
    prefill_chunk: int = Field(ge=1, description="tokens per prefill chunk when timing prefill")
    prefill_contexts: list[int] = Field(description="prefill grid: tokens cached before the chunk, increasing")
    prefill_ms_per_token: dict[str, list[Ms | None]] = Field(
        description="mixer -> [prefill context]: ms per token for one layer's mixer on one chunk")
    tokens: list[int] = Field(description="shared grid: tokens in a step, increasing")
    shared_ms: list[Ms | None] = Field(description="[tokens]: ms for one layer's MLP, both norms and residual adds")
    head_ms: list[Ms | None] = Field(description="[tokens]: ms for embedding lookup, final norm and lm_head rows")
    engine_ms: list[Ms] | None = Field(
        None, description="[batches]: ms the engine spends per step beside the model's layers and head, by rows in "
                          "the step: scheduling, step metadata, sampling, detokenizing (a whole engine step minus "
                          "the parts above); absent (tables made before it): 0")
    memory: MemoryEntry = Field(description="cache shapes: policies.memory.CacheMemoryModel.to_dict()")
    measurement: Measurement = Field(description="how the times were taken")

    @model_validator(mode="after")
    def _consistent(self) -> "SpeedFile":
        for name, lowest in (("batches", 1), ("contexts", 1), ("prefill_contexts", 0), ("tokens", 1)):
            values = getattr(self, name)
            if not values or values[0] < lowest or any(b <= a for a, b in zip(values, values[1:])):
                raise ValueError(f"{name} is {values}: expected strictly increasing integers >= {lowest}")
        timed = set(self.decode_ms) | set(self.prefill_ms_per_token)  # each needs both
        if not timed:
            raise ValueError("decode_ms times no mixer")
        keyed = [("decode_ms", timed), ("prefill_ms_per_token", set(self.prefill_ms_per_token))]
        for where, names in keyed + [(f"memory.layers.{i}", set(m)) for i, m in enumerate(self.memory.layers)]:
            if unknown := sorted(names - set(MIXER_NAMES)):
                raise ValueError(f"{where}: unknown mixer(s) {unknown}: known are {', '.join(MIXER_NAMES)}")
            if missing := sorted(timed - names):
                raise ValueError(f"{where} has no entry for timed mixer(s) {missing}")
        for name, grid in self.decode_ms.items():
            check_grid(f"decode_ms.{name}", grid, [("batch", self.batches), ("context", self.contexts)])
        for name, row in self.prefill_ms_per_token.items():
            check_grid(f"prefill_ms_per_token.{name}", row, [("context", self.prefill_contexts)])
        check_grid("shared_ms", self.shared_ms, [("tokens", self.tokens)])
        check_grid("head_ms", self.head_ms, [("tokens", self.tokens)])
        if self.engine_ms is not None:
            check_grid("engine_ms", self.engine_ms, [("batch", self.batches)])
        if len(self.memory.layers) != self.fingerprint.num_layers:
            raise ValueError(f"memory has {len(self.memory.layers)} layers, fingerprint.num_layers {self.fingerprint.num_layers}")
        return self


class DataFingerprint(_Model):
    path: str = Field(description="the text file as given on the command line")
    sha256: str = Field(description="sha256 of the file's bytes")
    context: int = Field(ge=2, description="tokens per window; each window is scored as its own sequence")
    windows: int = Field(ge=1, description="windows scored per placement")
    tokens: int = Field(ge=1, description="predicted tokens per placement (each window's first token is context only)")


class QualityResult(_Model):
    placement: str = Field(description="placement code, one letter per layer (A, S, G, K)")
    mean_loglik: float = Field(le=0, description="mean natural-log likelihood per predicted token")
    tokens: int = Field(ge=1, description="tokens the mean is over")


class QualityFile(_Model):
    format: Literal["supernet-router/quality"] = Field(description="file kind")
    version: Literal[1] = Field(description="format version")
    fingerprint: Fingerprint = Field(description="checkpoint, dtype and device the scores were measured with")
    data: DataFingerprint = Field(description="the text the scores are over")
    results: list[QualityResult] = Field(description="one entry per scored placement, in scoring order")

    @model_validator(mode="after")
    def _consistent(self) -> "QualityFile":
        codes = [r.placement for r in self.results]
        for i, code in enumerate(codes):
            try:
                Placement.parse(code, self.fingerprint.num_layers)
            except InvalidPlacement as exc:
                raise ValueError(f"results.{i}: {exc.message}") from None
        if repeated := sorted({c for c in codes if codes.count(c) > 1}):
            raise ValueError(f"results: placement(s) {repeated} appear more than once")
        return self


class HoldoutReport(_Model):
    fraction: float = Field(ge=0, lt=1, description="share of placements held out of the fit")
    seed: int = Field(description="seed of the train/test split")
    num_train: int = Field(ge=1, description="placements the surrogate was fitted on")
    num_test: int = Field(ge=0, description="held-out placements")
    spearman: float | None = Field(description="held-out Spearman rank correlation; null without a test set")
    r2: float | None = Field(description="held-out coefficient of determination; null without a test set")
    rmse: float | None = Field(None, description="held-out root mean squared error of the predicted mean "
                                                 "log-likelihood (nats/token); null without a test set")


class SurrogateBody(_Model):
    format: Literal["supernet-router/surrogate"] = Field(description="policies.surrogate format")
    version: Literal[1] = Field(description="policies.surrogate version")
    num_layers: int = Field(description="decoder layers")
    max_range: int = Field(description="longest interaction range (1 unary, 2 pairs, 3 triples)")
    mixers: list[str] = Field(description="mixer order of the last axes of the coefficient arrays")
    intercept: float = Field(description="constant term")
    ridge_alpha: float = Field(description="ridge strength chosen by cross-validation")
    unary: list[list[float]] = Field(description="[layer, mixer]")
    pair: list[list[list[float]]] | None = Field(None, description="[layer, mixer, mixer]; absent below range 2")
    triple: list[list[list[list[float]]]] | None = Field(None, description="[layer, m, m, m]; absent below range 3")


class SurrogateFile(_Model):
    format: Literal["supernet-router/surrogate-fit"] = Field(description="file kind")
    version: Literal[1] = Field(description="format version")
    fingerprint: Fingerprint = Field(description="copied from the quality file it was fitted on")
    quality_sha256: str = Field(description="sha256 of that quality file")
    holdout: HoldoutReport = Field(description="how well the fit ranks and predicts held-out placements")
    surrogate: SurrogateBody = Field(description="the fitted cluster expansion (policies.surrogate.to_dict)")


class OperatingPoint(_Model):
    cost_model: Literal["speed-table", "regression", "idealized"] = Field(description="where costs come from")
    cost_unit: Literal["ms", "fa-layers"] = Field(description="ms per decode step, or FA-layer units")
    batch: int | None = Field(description="rows per decode step (speed-table only)")
    context: int | None = Field(description="tokens cached per row (speed-table only)")
    extrapolated: bool = Field(description="true when the point lies outside the speed table's measured grid")
    reasons: list[str] = Field(description="why it is extrapolated")


class PresetEntry(_Model):
    name: str = Field(description="'q<retention %>-x<speed-up>', e.g. 'q97-x2.15'")
    placement: str = Field(description="placement code, one letter per layer")
    counts: dict[str, int] = Field(description="layers per mixer")
    predicted_quality: float = Field(description="surrogate prediction (mean log-likelihood per token)")
    retention: float = Field(description="exp(quality - all-attention quality): per-token likelihood ratio")
    cost: float = Field(description="decode step cost at the operating point, in cost_unit")
    speedup: float = Field(description="all-attention cost / this cost at the operating point")


class PresetsFile(_Model):
    format: Literal["supernet-router/presets"] = Field(description="file kind")
    version: Literal[1] = Field(description="format version")
    fingerprint: Fingerprint = Field(description="the checkpoint the quality side was measured on")
    speed_fingerprint: Fingerprint | None = Field(description="the speed table's fingerprint; null for linear models")
    operating_point: OperatingPoint = Field(description="the cost model and (batch, context) the costs are at")
    baseline: PresetEntry = Field(description="all-attention, against which retention and speed-up are given")
    frontier_points: int = Field(ge=1, description="placements on the exact Pareto frontier")
    presets: list[PresetEntry] = Field(description="presets spread along the frontier, cheapest first")

    @model_validator(mode="after")
    def _consistent(self) -> "PresetsFile":
        for entry in [self.baseline, *self.presets]:
            try:
                counts = Placement.parse(entry.placement, self.fingerprint.num_layers).counts()
            except InvalidPlacement as exc:
                raise ValueError(f"preset {entry.name!r}: {exc.message}") from None
            if entry.counts != {m.value: n for m, n in counts.items()}:
                raise ValueError(f"preset {entry.name!r}: counts {entry.counts} do not match placement {entry.placement}")
        if len(names := [p.name for p in self.presets]) != len(set(names)):
            raise ValueError(f"preset names repeat: {names}")
        return self


class AcceptanceCounts(_Model):
    verify_steps: int = Field(ge=0, description="verify steps run")
    drafted: int = Field(ge=0, description="tokens the draft proposed and the target verified")
    accepted: int = Field(ge=0, description="of which the target kept")
    rejected_steps: int = Field(ge=0, description="verify steps that refused a proposal (the rest kept all)")
    accepted_per_verify: float = Field(ge=0, description="mean proposals kept per verify step (a step yields one "
                                       "token more)")
    acceptance_rate: float = Field(ge=0, le=1, description="per-token acceptance: accepted / (accepted + "
                                   "rejected_steps), the proposals examined; the a in (1 - a^(k+1)) / (1 - a)")

    @model_validator(mode="after")
    def _consistent(self) -> "AcceptanceCounts":
        if self.accepted > self.drafted or self.rejected_steps > self.verify_steps:
            raise ValueError("accepted exceeds drafted, or rejected_steps exceeds verify_steps")
        examined = self.accepted + self.rejected_steps
        if examined and abs(self.acceptance_rate - self.accepted / examined) > 1e-6:
            raise ValueError(f"acceptance_rate {self.acceptance_rate} is not accepted / (accepted + rejected_steps)")
        return self


class AcceptanceEntry(_Model):
    target: str = Field(description="the verifying placement's code")
    draft: str = Field(description="the drafting placement's code")
    greedy: AcceptanceCounts = Field(description="temperature 0")
    sampled: AcceptanceCounts = Field(description="temperature 1 (speculative sampling)")


class AcceptanceData(_Model):
    source: str = Field(description="the text the prompts were cut from")
    prompts: int = Field(ge=1, description="prompts per (target, draft) and mode")
    prompt_tokens: int = Field(ge=1, description="tokens per prompt")
    max_tokens: int = Field(ge=1, description="tokens generated per prompt")
    seed: int = Field(description="sampling seed of the temperature-1 runs")


class AcceptanceFile(_Model):
    format: Literal["supernet-router/acceptance"] = Field(description="file kind")
    version: Literal[1] = Field(description="format version")
    fingerprint: Fingerprint = Field(description="the checkpoint it was measured on")
    draft_tokens: int = Field(ge=1, description="tokens drafted per verify step in the measurement")
    data: AcceptanceData = Field(description="what was generated")
    entries: list[AcceptanceEntry] = Field(description="one per (target, draft) pair")

    @model_validator(mode="after")
    def _consistent(self) -> "AcceptanceFile":
        pairs = [(e.target, e.draft) for e in self.entries]
        if len(pairs) != len(set(pairs)):
            raise ValueError(f"(target, draft) pairs repeat: {pairs}")
        for entry in self.entries:
            for code in (entry.target, entry.draft):
                try:
                    Placement.parse(code, self.fingerprint.num_layers)
                except InvalidPlacement as exc:
                    raise ValueError(f"pair ({entry.target}, {entry.draft}): {exc.message}") from None
        return self


Table = TypeVar("Table", SpeedFile, QualityFile, SurrogateFile, PresetsFile, AcceptanceFile)
KIND = {SpeedFile: "speed table", QualityFile: "quality table", SurrogateFile: "surrogate fit", PresetsFile: "presets",
        AcceptanceFile: "acceptance table"}


def parse_table(data: object, model: type[Table], source: str) -> Table:
    """Validate decoded JSON as ``model``: format, then version, then every field."""
    fmt = model.model_fields["format"].annotation.__args__[0]
    version = model.model_fields["version"].annotation.__args__[0]
    where = f"{source} ({KIND[model]})"
    if not isinstance(data, dict):
        raise TableMismatch(f"{where}: expected a JSON object, got {type(data).__name__}")
    if data.get("format") != fmt:
        raise TableMismatch(f"{where}: 'format' is {data.get('format')!r}, expected {fmt!r}")
    if data.get("version") != version:
        raise TableMismatch(f"{where}: 'version' is {data.get('version')!r}, this code reads version {version}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first, errors = exc.errors()[0], exc.errors()
        loc = ".".join(str(part) for part in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise TableMismatch(f"{where}: {loc + ': ' if loc else ''}{message}{more}") from None


def read_table(path: str | Path, model: type[Table]) -> Table:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read this {KIND[model]} file ({exc.strerror})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TableMismatch(f"{path} ({KIND[model]}): not valid JSON ({exc.msg} at line {exc.lineno})") from None
    return parse_table(data, model, str(path))


def write_table(path: str | Path, table: BaseModel) -> Path:
    """Write atomically (a temporary file renamed over ``path``), so a crash never leaves half a table."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(handle, "w") as file:
        file.write(_dumps(table.model_dump(mode="json")) + "\n")
    os.replace(temporary, path)
    return path


def _dumps(value: object, indent: int = 0) -> str:
    """JSON with one key per line but lists of plain numbers (grid rows) kept on one line."""
    pad, end = " " * (indent + 1), " " * indent
    if isinstance(value, dict) and value:
        return "{\n" + ",\n".join(f"{pad}{json.dumps(k)}: {_dumps(v, indent + 1)}" for k, v in value.items()) + f"\n{end}}}"
    if isinstance(value, list) and any(isinstance(v, (list, dict)) for v in value):
        return "[\n" + ",\n".join(pad + _dumps(v, indent + 1) for v in value) + f"\n{end}]"
    return json.dumps(value)


def check_layers(what: str, num_layers: int, other: str, other_layers: int) -> None:
    """Refuse tables measured for a different depth: ``TableMismatch`` naming both."""
    if num_layers != other_layers:
        raise TableMismatch(f"{what} is for {num_layers} layers but {other} has {other_layers}: "
                            "they must describe the same model")


def read_speed_model(path: str | Path) -> SpeedModel:
    """A speed table file as the cost model's numbers."""
    return SpeedModel.from_file(read_table(path, SpeedFile))
