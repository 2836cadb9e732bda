"""The model registry: registering a version, its aliases (@champion, @challenger) and the lock
that serialises moving them, taking a failed run's version back, reading versions, and loading a
registered model only after its files match the digest recorded at registration.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, RESOURCE_DOES_NOT_EXIST, ErrorCode

from calibflow.names import CALIBRATED, TEMPERATURE, on_test, version_tag
from calibflow.errors import (
    ModelArtifactsChanged,
    NotFound,
    PromotionConflict,
    RegistrationLeftBehind,
    StoreUnreachable,
    UnverifiedModel,
    one_line,
)
from calibflow.tracking.store import client, redact, store_wait, tracking_uri_for_display
from calibflow.tracking.served_model import (
    DIGEST_TAG,
    REGISTERED_MODEL_META,
    SERVED_MODEL_CODE,
    artifacts_digest,
    stored_model_tags,
)


CHAMPION = "champion"


CHALLENGER = "challenger"


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    alias: str
    model_uri: str
    replaced: str | None = None  # the version `alias` pointed to before this one took it


def register_version(
    model_uri: str, model_name: str, tags: Mapping[str, Any], description: str | None = None
) -> RegisteredVersion:
    """Register the logged model with all its tags in one call, describe it (`description`, or its
    lineage read from `tags`: version_description), then give it an alias: champion when the model
    has none yet, else challenger. The alias is the last write; if any write fails, the new version
    is deleted again, so no half-registered version is left behind (or, when even that fails,
    RegistrationLeftBehind says so)."""
    c = client()
    tags = {**{k: str(v) for k, v in tags.items()}, **stored_model_tags(model_uri)}
    with store_wait():
        number = str(mlflow.register_model(model_uri, model_name, tags=tags).version)
    try:
        c.update_model_version(
            model_name, number, description=description or version_description(model_name, number, tags)
        )
        # Decided under the lock `promote` takes: two first registrations at once would otherwise
        # both see no champion, both report @champion, and leave one of them bare.
        with promotion_lock(model_name, _holder(f"registration of version {number}")):
            before = aliases(model_name)
            alias = CHALLENGER if before.get(CHAMPION) else CHAMPION
            c.set_registered_model_alias(model_name, alias, number)
    except Exception as error:
        _delete_version(model_name, number, error)
        raise
    return RegisteredVersion(model_name, number, alias, f"models:/{model_name}@{alias}", replaced=before.get(alias))


def _delete_version(model_name: str, version: str, cause: BaseException) -> None:
    try:
        client().delete_model_version(model_name, version)
    except Exception as error:
        raise RegistrationLeftBehind(
            f"version {version} of {model_name} was registered, then the run failed ({type(cause).__name__}: "
            f"{cause}), and deleting it failed too ({type(error).__name__}: {error}); it may still be registered, "
            f"with an alias: check `calibflow status --model {model_name}` and delete it in the MLflow UI, or with "
            f"MlflowClient().delete_model_version({model_name!r}, {version!r}), once the store answers"
        ) from cause


def _holder(what: str) -> str:
    import socket

    return f"{what}, pid {os.getpid()} on {socket.gethostname()}"


def alias_version(model_name: str, alias: str) -> str | None:
    """The version `alias` points at, or None when the model or the alias does not exist."""
    try:
        aliases = client().get_registered_model(model_name).aliases
    except MlflowException as error:
        if error.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            return None
        raise
    version = aliases.get(alias)
    return None if version is None else str(version)


@dataclass(frozen=True)
class VersionRecord:
    name: str
    version: str
    run_id: str
    tags: dict[str, str]


def alias_record(model_name: str, alias: str) -> VersionRecord | None:
    version = alias_version(model_name, alias)
    return None if version is None else resolve_model_uri(f"models:/{model_name}/{version}")


def resolve_model_uri(model_uri: str) -> VersionRecord:
    """`models:/NAME@ALIAS` or `models:/NAME/VERSION` to the registry's record of that version."""
    if not model_uri.startswith("models:/"):
        raise ValueError(f"{model_uri!r} is not a registry URI: use models:/NAME@ALIAS or models:/NAME/VERSION")
    rest = model_uri.removeprefix("models:/")
    c = client()
    try:
        if "@" in rest:
            name, alias = rest.split("@", 1)
            version = c.get_model_version_by_alias(name, alias)
        else:
            name, number = rest.rsplit("/", 1)
            version = c.get_model_version(name, number)
    except MlflowException as error:  # an answer; a store that did not answer raises StoreUnreachable
        raise NotFound(
            f"{model_uri} not found in the registry at {tracking_uri_for_display()}: {redact(one_line(error))}"
        ) from error
    return VersionRecord(
        name=version.name, version=str(version.version), run_id=version.run_id, tags=dict(version.tags)
    )


def load_model(model_uri: str):
    """The registered pyfunc at `model_uri` (models:/NAME@ALIAS or models:/NAME/VERSION), loaded
    from a local copy of its files only after their digest matched the one recorded at
    registration: until then nothing of it is unpickled, imported or run. UnverifiedModel (a
    LookupError) when there is no digest to check or it does not match."""
    record = resolve_model_uri(model_uri)
    expected = record.tags.get(DIGEST_TAG)
    if not expected:
        raise UnverifiedModel(
            f"version {record.version} of {record.name} has no {DIGEST_TAG} tag: it was registered before calibflow "
            f"stored models without pickles and recorded their digest, so calibflow will not load it (its "
            f"python_model.pkl would run as code); use a version registered since (infra/TRUST.md says how to retire "
            f"such a version from @champion)"
        )
    with tempfile.TemporaryDirectory() as tmp:
        location = client().get_model_version_download_uri(record.name, record.version)
        with store_wait():
            local = mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=tmp)
        found = artifacts_digest(local, registered_as=(record.name, record.version))
        if found != expected:
            raise ModelArtifactsChanged(
                f"model artifacts changed since registration: the files of version {record.version} of {record.name} "
                f"at {redact(location)} hash to {found}, not the {DIGEST_TAG} {expected} recorded when it was registered; "
                f"nothing of it was loaded. Restore them from a trusted copy or retrain (see infra/TRUST.md)"
            )
        # Left out of the digest only as MLflow's exact record of this version, and never read by
        # MLflow when loading: removed so what MLflow loads is exactly the files registration hashed.
        (Path(local) / REGISTERED_MODEL_META).unlink(missing_ok=True)
        check_served_code(local, record)
        warn_requirement_mismatches(local)
        # MLflow's own check of the same requirements resolves every installed package's import
        # names from its file list: 2.5 s of every model load here, for the four pins we write.
        return mlflow.pyfunc.load_model(local, suppress_warnings=True)


def check_served_code(model_dir: str | Path, record: VersionRecord) -> None:
    """UnverifiedModel for a version whose stored code this calibflow cannot run: its models-from-code
    file imports the package's layout of the day it was registered (calibflow.registry before the
    library moved into sub-packages), and MLflow would fail inside that import with a store error
    that names neither the version nor the fix."""
    import yaml

    flavor = yaml.safe_load((Path(model_dir) / "MLmodel").read_text()).get("flavors", {}).get("python_function", {})
    code = Path(str(flavor.get("model_code_path", ""))).name
    if code != SERVED_MODEL_CODE.name:
        raise UnverifiedModel(
            f"version {record.version} of {record.name} was registered by an earlier calibflow (its model code is "
            f"{code or 'not models-from-code'}, not {SERVED_MODEL_CODE.name}), whose package layout this one cannot "
            f"load; retrain it, or retire it from @champion (infra/TRUST.md)"
        )


def requirement_mismatches(model_dir: str | Path) -> list[str]:
    """The model's pinned requirements (requirements.txt, `name==version`, as
    log_calibrated_model writes them) and Python version that this environment does not have."""
    import platform
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    from mlflow.models import Model

    found = []
    requirements = Path(model_dir) / "requirements.txt"
    for line in requirements.read_text().splitlines() if requirements.exists() else []:
        name, _, pinned = line.strip().partition("==")
        if not pinned or name.startswith(("#", "-")):
            continue
        try:
            here = installed(name).split("+")[0]
        except PackageNotFoundError:
            here = "not installed"
        if here != pinned.split("+")[0]:
            found.append(f"{name}=={pinned} (here {here})")
    flavor = Model.load(str(Path(model_dir) / "MLmodel")).flavors.get("python_function", {})
    python = flavor.get("python_version")
    if python and python.rsplit(".", 1)[0] != platform.python_version().rsplit(".", 1)[0]:
        found.append(f"python {python} (here {platform.python_version()})")
    return found


def warn_requirement_mismatches(model_dir: str | Path) -> None:
    import logging

    mismatches = requirement_mismatches(model_dir)
    if mismatches:
        logging.getLogger(__name__).warning(
            "the model was logged with %s; its predictions may differ here", ", ".join(mismatches)
        )


PREVIOUS_CHAMPION = "previous-champion"


LOCK_SUFFIX = "--promotion-lock"


@contextmanager
def promotion_lock(model_name: str, holder: str, wait_s: float = 30.0, stale_after_s: float = 900.0):
    """Exclusive lock on a model's aliases, made of the registry's own uniqueness rule: creating a
    registered model whose name exists fails atomically in every MLflow store (a unique key in
    SQL), so whoever creates `<name>--promotion-lock` holds the lock until it deletes it. Works
    across processes and machines that share the tracking server. A lock older than
    `stale_after_s` (a crashed holder) is broken."""
    c = client()
    lock_name = model_name + LOCK_SUFFIX
    deadline = time.monotonic() + wait_s
    while True:
        try:
            c.create_registered_model(
                lock_name,
                tags={"holder": holder, "acquired_at": str(time.time())},
                description=f"promotion lock of {model_name}; delete it only if its holder died",
            )
            break
        except MlflowException as error:
            if error.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
                # SQL stores answer a lost insert race by reading the winner's row; the holder
                # released it in between (seen in CI: "...--promotion-lock not found"): free now
                continue
            if error.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
            held = _lock_info(lock_name)
            if held and time.time() - float(held.get("acquired_at", "inf")) > stale_after_s:
                _delete_quietly(lock_name)
                continue
            if time.monotonic() > deadline:
                raise PromotionConflict(
                    f"another promotion of {model_name} holds the lock ({held or 'unknown holder'}); "
                    f"try again when it is done"
                ) from error
            time.sleep(0.2)
    try:
        yield
    finally:
        _delete_quietly(lock_name)


def _lock_info(lock_name: str) -> dict[str, str] | None:
    try:
        return dict(client().get_registered_model(lock_name).tags)
    except (MlflowException, StoreUnreachable):
        return None


def _delete_quietly(lock_name: str) -> None:
    try:
        client().delete_registered_model(lock_name)
    except (MlflowException, StoreUnreachable):
        pass


def aliases(model_name: str) -> dict[str, str]:
    return {alias: str(version) for alias, version in client().get_registered_model(model_name).aliases.items()}


def apply_aliases(model_name: str, target: Mapping[str, str | None]) -> None:
    """Move aliases to `target` (None deletes one). Any failure restores every alias as it was."""
    c = client()
    before = aliases(model_name)
    try:
        for alias, version in target.items():
            if version is None:
                if alias in before:
                    c.delete_registered_model_alias(model_name, alias)
            else:
                c.set_registered_model_alias(model_name, alias, version)
    except Exception:
        _restore_aliases(model_name, before, target)
        raise


def _restore_aliases(model_name: str, before: Mapping[str, str], touched: Mapping[str, str | None]) -> None:
    c = client()
    for alias in touched:
        try:
            if alias in before:
                c.set_registered_model_alias(model_name, alias, before[alias])
            else:
                c.delete_registered_model_alias(model_name, alias)
        except (MlflowException, StoreUnreachable):
            pass  # never set in the first place


def describe_verdict(model_name: str, version: str, line: str, record: list[str]) -> None:
    """The version's description with its new verdict line first (run_summary.with_new_verdict)."""
    from calibflow.pipeline import run_summary
    from calibflow.tracking import store

    old = store.version_description(model_name, version)
    title = f"**{model_name} version {version}**"  # the registered page's title, which names its alias then
    store.set_version_description(model_name, version, run_summary.with_new_verdict(old, line, record, title=title))


def describe_champion_again(model_name: str, version: str, why: str) -> None:
    """A version that is @champion again (a rollback, an undone promotion): a PROMOTED verdict line
    first in its description, with when and `why`."""
    from calibflow import names

    tags = resolve_model_uri(f"models:/{model_name}/{version}").tags
    at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    describe_verdict(
        model_name,
        version,
        f"PROMOTED · {names.verdict_text(tags) or names.PROMOTED}",
        [f"`@champion` again at {at}: {why}"],
    )


def _reinstated(model_name: str, version: str, undone: str) -> None:
    """@champion is back on `version` because `undone`, which had replaced it, was taken back: its
    verdict/promoted tag and description say it is the champion again, not "replaced"."""
    from calibflow import names

    set_version_tags(model_name, version, {names.VERDICT_PROMOTED: names.PROMOTED})
    describe_champion_again(
        model_name, version, f"version {undone}, which had replaced it, was taken back when its run failed."
    )


def undo_registration(version: RegisteredVersion) -> None:
    """Take back a version that a failed run registered, and its promotion to @champion if it got
    one (the champion it replaced is tagged and described as the champion again). Under the
    promotion lock, each alias the version moved goes back where it was unless another process
    has moved it since (compare-and-swap: a later registration's @challenger stays); then the
    version is deleted. Any failure raises RegistrationLeftBehind, which says what may be left."""
    name, number = version.name, version.version
    try:
        with promotion_lock(name, _holder(f"undoing the registration of version {number}")):
            current = aliases(name)
            # alias -> (where it pointed before this version, where this version left it); None: unset
            moved: dict[str, tuple[str | None, str | None]] = {version.alias: (version.replaced, number)}
            if version.alias == CHALLENGER and current.get(CHAMPION) == number:
                # Promoted since (`promote`, by this run or by CD): @champion goes back to the version
                # it replaced, now @previous-champion, and @previous-champion to where that one was
                # promoted from, as `rollback` does; @challenger, which `promote` dropped, comes back.
                replaced = current.get(PREVIOUS_CHAMPION)
                moved.update({CHAMPION: (replaced, number), CHALLENGER: (version.replaced, None)})
                if replaced:
                    before = resolve_model_uri(f"models:/{name}/{replaced}").tags.get("promoted_from") or None
                    moved[PREVIOUS_CHAMPION] = (before, replaced)
            c = client()
            reinstated = None
            for alias, (before, left) in moved.items():
                if current.get(alias) != left or before == left:
                    continue  # moved by someone else since, or nothing to undo
                if before is None:
                    c.delete_registered_model_alias(name, alias)
                else:
                    c.set_registered_model_alias(name, alias, before)
                    reinstated = before if alias == CHAMPION else reinstated
            c.delete_model_version(name, number)  # also drops any alias still on it
            if reinstated is not None:
                _reinstated(name, reinstated, number)
    except Exception as error:
        raise RegistrationLeftBehind(
            f"version {number} of {name} was registered as @{version.alias}, then the run failed, and taking it back "
            f"failed ({type(error).__name__}: {error}): it may still be registered and aliased; check `calibflow status "
            f"--model {name}` and delete it in the MLflow UI, or with MlflowClient().delete_model_version({name!r}, "
            f"{number!r}), once the store answers"
        ) from error


@contextmanager
def registration_transaction(
    register: Callable[[], RegisteredVersion], undo: Callable[[RegisteredVersion], None] = undo_registration
) -> Iterator[RegisteredVersion]:
    """Register a version (`register`: register_version, or a task around it), then run the block
    that completes the registration (promotion, closing the run). The block either finishes, or the
    version and every alias it moved are taken back (`undo`: undo_registration, or a task around it)
    and its error is raised; when the undo fails too, RegistrationLeftBehind names what stands and
    the error it was taking back. The flow and `calibflow recalibrate` both register through here."""
    version = register()
    try:
        yield version
    except Exception as error:
        try:
            undo(version)
        except RegistrationLeftBehind as left:
            raise RegistrationLeftBehind(f"{left}. The run failed on: {type(error).__name__}: {error}") from error
        raise


def set_version_tags(model_name: str, version: str, tags: Mapping[str, Any]) -> None:
    c = client()
    for key, value in tags.items():
        c.set_model_version_tag(model_name, version, key, str(value))


def list_versions(model_name: str) -> list[VersionRecord]:
    found = client().search_model_versions(_name_filter(model_name))
    return sorted(
        (VersionRecord(v.name, str(v.version), v.run_id, dict(v.tags)) for v in found if v.name == model_name),
        key=lambda r: int(r.version),
    )


def _name_filter(model_name: str) -> str:
    """An MLflow filter string selecting `model_name`. Its parser has no escape for a quote inside
    a quoted value (a name like "it's" broke `name='...'`), so the name is quoted with the quote
    it lacks; a name holding both is matched with LIKE, each quote a one-character wildcard, and
    callers keep only the exact name."""
    if "'" not in model_name:
        return f"name='{model_name}'"
    if '"' not in model_name:
        return f'name="{model_name}"'
    return "name LIKE '" + model_name.replace("'", "_").replace('"', "_") + "'"


# What `calibflow status` shows: here beside the registry rather than in calibflow.lifecycle.promotion,
# which imports torch and scipy for the gates; a status needs only the registry (under 2 s cold).
# The calibrated test ECE, accuracy and T under short column names, read with calibflow.names.version_tag
# so that versions registered before calibflow.names (tags ece_post, accuracy, temperature) show too.
STATUS_TAGS = {
    "ece": on_test(CALIBRATED, "ece"),
    "accuracy": on_test(CALIBRATED, "accuracy"),
    "temperature": TEMPERATURE,
    "data_hash": "data_hash",
    "promoted_from": "promoted_from",
}


STATUS_COLUMNS = ("version", "aliases", *STATUS_TAGS)
STATUS_NUMBERS = ("ece", "accuracy", "temperature")  # shown to 4 decimals (shown_number)


def status(model_name: str) -> list[dict[str, str]]:
    by_version: dict[str, list[str]] = {}
    for alias, version in aliases(model_name).items():
        by_version.setdefault(version, []).append("@" + alias)
    return [
        {
            "version": r.version,
            "aliases": " ".join(sorted(by_version.get(r.version, []))),
            **{column: version_tag(r.tags, tag, "") for column, tag in STATUS_TAGS.items()},
            **{column: shown_number(version_tag(r.tags, STATUS_TAGS[column], "")) for column in STATUS_NUMBERS},
        }
        for r in list_versions(model_name)
    ]


# What a reviewer reads on a version's page, beside the lineage version_tags() records (data_hash,
# data_path, data_rev, git_commit, params_hash, seed, split_digest): how many images each split
# held, the params that shape the model most (every param is on the run), and its run's verdict
# under the run's own tag names (gate/verdict, gate/absolute, gate/against, gate/<check>).
SPLIT_SIZES_TAG = "split_sizes"
KEY_PARAM_PREFIX = "params/"
KEY_PARAMS = (
    "model.arch",
    "model.width",
    "model.ensemble",
    "train.epochs",
    "train.batch_size",
    "train.lr",
    "train.loss",
    "train.augment",
    "calibration.method",
)
SPLITS = ("train", "val", "calibration", "test")


def lineage_tags(
    *, split_sizes: Mapping[str, int], params: Mapping[str, Any], verdict_tags: Mapping[str, str]
) -> dict[str, str]:
    """The version tags that complete its lineage and verdict (see SPLIT_SIZES_TAG): `params` is the
    run's flat params (Config.flat()), of which KEY_PARAMS are kept; `verdict_tags` the run's
    verdict (calibflow.pipeline.tagging.RunVerdict.tags())."""
    import json

    return {
        SPLIT_SIZES_TAG: json.dumps({name: int(split_sizes[name]) for name in SPLITS if name in split_sizes}),
        **{f"{KEY_PARAM_PREFIX}{key}": str(params[key]) for key in KEY_PARAMS if key in params},
        **verdict_tags,
    }


def recorded_verdict(tags: Mapping[str, str]) -> str | None:
    """The verdict a version's (or a run's) tags record, in one line (calibflow.names.verdict_text);
    for one recorded before the failed checks were, they are read back from its gate/<check> tags.
    None when it records none."""
    from calibflow.names import VERDICT_FAILED, verdict_text

    text = verdict_text(tags)
    if text and VERDICT_FAILED not in tags:
        failed = _failed_from_check_tags(tags)
        text += f" · failed: {'; '.join(failed)}" if failed else ""
    return text


def _failed_from_check_tags(tags: Mapping[str, str]) -> list[str]:
    """Failed checks read back from gate/<check> tags ("FAILED: smooth ECE 0.0110, 95% upper 0.0235
    > 0.05"), for versions and runs recorded before calibflow.names.VERDICT_FAILED; a failed check written with
    the relation it required ("<= 0.05") reads with the one that holds."""
    import re

    from calibflow.names import gate_tag

    prefix = gate_tag("")
    found = []
    for key, text in sorted(tags.items()):
        match = re.search(r"(\S+) (<=|>=|<|>) (\S+)$", text) if text.startswith("FAILED") else None
        if key.startswith(prefix) and match:
            relation = {"<=": ">", ">=": "<"}.get(match.group(2), match.group(2))
            found.append(f"{key.removeprefix(prefix)} {match.group(1)} {relation} {match.group(3)}")
    return found


def _split_sizes_text(tags: Mapping[str, str]) -> str:
    import json

    try:
        sizes = json.loads(tags.get(SPLIT_SIZES_TAG) or "{}")
    except ValueError:
        sizes = {}
    shown = " · ".join(f"{name} {count}" for name, count in sizes.items()) or "sizes not recorded"
    return f"{shown} (split digest `{tags.get('split_digest', '?')}`)"


def shown_number(text: str | None, digits: int = 4) -> str:
    """A rate, an error or T as people read it: 0.8319, not 0.8319444444444445 (text kept as it is
    when it is not a number)."""
    if not text:
        return ""
    try:
        return f"{float(text):.{digits}f}"
    except ValueError:
        return text


def version_description(
    model_name: str,
    version: str,
    tags: Mapping[str, str],
    *,
    alias: str | None = None,
    run_id: str | None = None,
    summary: str = "",
) -> str:
    """The version's description in MLflow, what a reviewer reads first: its verdict, then where it
    came from (data, code, params, split) and its calibrated test numbers, all read from its tags;
    then `summary` (the run's own summary), when given."""
    from calibflow.names import CALIBRATED, CALIBRATION_METHOD

    verdict = recorded_verdict(tags) or "verdict not recorded on this version"
    key_params = ", ".join(
        f"{key.removeprefix(KEY_PARAM_PREFIX)} {value}"
        for key, value in tags.items()
        if key.startswith(KEY_PARAM_PREFIX)
    )
    temperature = tags.get(TEMPERATURE)
    calibration = tags.get(CALIBRATION_METHOD, "?") + (f", T {shown_number(temperature)}" if temperature else "")
    rows = [
        ("verdict", verdict),
        (
            "data",
            f"`{tags.get('data_path', '?')}` at git revision `{tags.get('data_rev', '?')}`, "
            f"DVC hash `{tags.get('data_hash', '?')}`",
        ),
        ("code", f"git commit `{tags.get('git_commit', '?')}`"),
        (
            "params",
            f"hash `{tags.get('params_hash', '?')}`, seed {tags.get('seed', '?')}"
            + (f"; {key_params}" if key_params else ""),
        ),
        ("split", _split_sizes_text(tags)),
        (
            "test (calibrated)",
            f"ECE {shown_number(version_tag(tags, on_test(CALIBRATED, 'ece'), ''))}, "
            f"accuracy {shown_number(version_tag(tags, on_test(CALIBRATED, 'accuracy'), ''))}; calibration {calibration}",
        ),
    ]
    if run_id:
        rows.append(("MLflow run", f"`{run_id}`"))
    head = f"**{model_name} version {version}**" + (f" (@{alias})" if alias else "") + f": {verdict}"
    lines = [head, "", "| | |", "| --- | --- |", *(f"| {name} | {text} |" for name, text in rows)]
    if summary:
        lines += ["", summary]
    return "\n".join(lines)


def run_params(run_id: str) -> dict[str, str] | None:
    """The MLflow params of a version's run, as text (store.log_params), or None when the run is gone."""
    try:
        return dict(client().get_run(run_id).data.params)
    except MlflowException as error:
        if error.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            return None
        raise


@dataclass(frozen=True)
class SameBuild:
    """A registered version built from the data, params and code a run is about to train on, and
    the gates.* params that differ from those its run was gated under."""

    name: str
    version: str
    aliases: tuple[str, ...]
    changed_gates: dict[str, tuple[str | None, str | None]]  # gates.<key>: (its run's, this run's)

    @property
    def is_champion(self) -> bool:
        return CHAMPION in self.aliases

    def describe(self) -> str:
        """ "version 2 (@challenger)", "version 1 (no alias)"."""
        return f"version {self.version} ({' '.join('@' + a for a in self.aliases) or 'no alias'})"

    def describe_changes(self) -> str:
        return ", ".join(f"{key} {old} -> {new}" for key, (old, new) in sorted(self.changed_gates.items()))


def as_logged_param(value: Any) -> str:
    """A param's value as MLflow holds it (store.log_params): JSON for a list or mapping, str() else."""
    import json

    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def same_build(
    model_name: str,
    *,
    data_hash: str,
    params_hash: str,
    git_commit: str,
    git_dirty: bool,
    gate_params: Mapping[str, Any],
    code_tree: str | None = None,
    init_weights_sha256: str | None = None,
) -> SameBuild | None:
    """The registered version that retraining on this data, params, initial weights (the SHA-256
    of the file the network starts from; None: the seeded initialisation) and code would reproduce:
    @champion when it is one, else the newest such version (a @challenger that failed the champion
    comparison, or one no alias points at any more); None when none is. A recalibrated version is
    not one (its calibrator was fitted on other images); the version it came from is.
    `gate_params`: this run's gates.* params, compared with those the version's run was gated under."""
    from calibflow.pipeline.tagging import unchanged_build

    try:
        versions = list_versions(model_name)
        by_version: dict[str, list[str]] = {}
        for alias, number in aliases(model_name).items():
            by_version.setdefault(number, []).append(alias)
    except MlflowException as error:
        if error.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            return None
        raise
    matches = [
        record
        for record in versions
        if not record.tags.get("recalibrated_from")
        and unchanged_build(
            record.tags,
            data_hash=data_hash,
            params_hash=params_hash,
            git_commit=git_commit,
            git_dirty=git_dirty,
            code_tree=code_tree,
            init_weights_sha256=init_weights_sha256,
        )
    ]
    if not matches:
        return None
    found = max(matches, key=lambda r: (CHAMPION in by_version.get(r.version, []), int(r.version)))
    recorded = run_params(found.run_id) or {}
    wanted = {key: as_logged_param(value) for key, value in gate_params.items()}
    changed = {
        key: (recorded.get(key), wanted.get(key))
        for key in sorted(set(wanted) | {k for k in recorded if k.startswith("gates.")})
        if recorded.get(key) != wanted.get(key)
    }
    return SameBuild(model_name, found.version, tuple(sorted(by_version.get(found.version, []))), changed)
