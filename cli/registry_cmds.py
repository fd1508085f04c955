"""Registry commands: init, seeds, experts (list/show/export/import/remove), compositions, lineage, gc."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.tree import Tree

from xmerge.cli.app import app
from xmerge.cli.errors import console, user_errors
from xmerge.registry import Expert, Registry, RegistryError

Home = Annotated[Path | None, typer.Option("--home", envvar="XMERGE_HOME",
                                              help="Registry home (default ./.xmerge).")]
DbUrl = Annotated[str | None, typer.Option("--db-url", envvar="XMERGE_DB_URL",
                                              help="Database URL (default sqlite:///<home>/registry.db), "
                                                   "e.g. postgresql+psycopg://user@host/db.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of a table.")]

seeds_app = typer.Typer(help="Seed students (the shared starting point of every expert).\n\n"
                        "Example: xmerge seeds list", no_args_is_help=True)
experts_app = typer.Typer(help="Domain experts: list, show, export/import bundles, remove.\n\n"
                          "Example: xmerge experts list --domain math", no_args_is_help=True)
compositions_app = typer.Typer(help="Merged compositions of experts.\n\n"
                               "Example: xmerge compositions list", no_args_is_help=True)
app.add_typer(seeds_app, name="seeds")
app.add_typer(experts_app, name="experts")
app.add_typer(compositions_app, name="compositions")


def _echo_json(value) -> None:
    typer.echo(json.dumps(_plain(value), indent=2, sort_keys=True, default=str))


def _plain(value):
    if dataclasses.is_dataclass(value):
        return {**dataclasses.asdict(value), **({"ref": value.ref} if hasattr(value, "ref") else {})}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _short(sha: str) -> str:
    return sha[:12]


def _table(title: str, columns: list[str], rows: list[list]) -> None:
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    console.print(table)


def _show(title: str, record) -> None:
    table = Table(title=title, show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for key, value in _plain(record).items():
        nested = isinstance(value, dict | list)
        table.add_row(key, json.dumps(value, sort_keys=True, default=str) if nested else str(value))
    console.print(table)


@app.command("init")
def init_cmd(home: Home = None, db_url: DbUrl = None) -> None:
    """Create the registry (or upgrade its schema) and clean temp files left by killed processes.

    Example: xmerge init --home /data/xmerge
    """
    with user_errors():
        reg = Registry(home, db_url)
        reg.init()
        console.print(f"registry ready at [bold]{reg.home}[/]")


@seeds_app.command("list")
def seeds_list(home: Home = None, db_url: DbUrl = None, as_json: AsJson = False) -> None:
    """List registered seeds.

    Example: xmerge seeds list --json
    """
    with user_errors():
        seeds = Registry(home, db_url).list_seeds()
    if as_json:
        return _echo_json(seeds)
    _table("seeds", ["id", "name", "teacher", "teacher hash", "weights", "files", "created"],
           [[s.id, s.name, s.teacher_spec, _short(s.teacher_hash), _short(s.weights_sha), len(s.files),
             f"{s.created_at:%Y-%m-%d %H:%M}"] for s in seeds])


@experts_app.command("list")
def experts_list(seed: Annotated[str | None, typer.Option(help="Only this seed's experts.")] = None,
                 domain: Annotated[str | None, typer.Option(help="Only this domain.")] = None,
                 home: Home = None, db_url: DbUrl = None, as_json: AsJson = False) -> None:
    """List experts, optionally of one seed and/or domain.

    Example: xmerge experts list --domain math
    """
    with user_errors():
        experts = Registry(home, db_url).list_experts(seed=seed, domain=domain)
    if as_json:
        return _echo_json(experts)
    _table("experts", ["id", "seed", "expert", "team", "status", "weights", "created"],
           [[e.id, e.seed, e.ref, e.team, e.status, _short(e.weights_sha), f"{e.created_at:%Y-%m-%d %H:%M}"]
            for e in experts])


@experts_app.command("show")
def experts_show(ref: Annotated[str, typer.Argument(help="Expert id or ref (math, math@v2, SEED/math).")],
                 home: Home = None, db_url: DbUrl = None, as_json: AsJson = False) -> None:
    """Show one expert with its recipe, metrics and files.

    Example: xmerge experts show math@v2
    """
    with user_errors():
        expert = Registry(home, db_url).resolve(f"expert:{ref}" if ref.isdigit() else ref)
        if not isinstance(expert, Expert):
            raise RegistryError(f"'{ref}' is a {type(expert).__name__.lower()}, not an expert")
    if as_json:
        return _echo_json(expert)
    _show(f"expert {expert.id}", expert)


@experts_app.command("export")
def experts_export(expert_id: Annotated[int, typer.Argument(help="Expert id (see `xmerge experts list`).")],
                   out: Annotated[Path, typer.Option("-o", "--out", help="Bundle file to write.")],
                   home: Home = None, db_url: DbUrl = None) -> None:
    """Write one expert as a bundle (weights + manifest with hashes and seed identity) for another team.

    Example: xmerge experts export 3 -o math-v2.xmerge.tar
    """
    with user_errors(), console.status(f"exporting expert {expert_id}"):
        path = Registry(home, db_url).export_expert(expert_id, out)
    console.print(f"wrote [bold]{path}[/]")


@experts_app.command("import")
def experts_import(bundle: Annotated[Path, typer.Argument(help="Bundle file written by `xmerge experts export`.")],
                   home: Home = None, db_url: DbUrl = None, as_json: AsJson = False) -> None:
    """Verify a bundle (hashes, seed identity, tensor layout, NaN/inf) and register its expert.

    The expert gets the next free version of its domain. On any failure nothing is written.
    Example: xmerge experts import math-v2.xmerge.tar
    """
    with user_errors(), console.status(f"verifying {bundle.name}"):
        expert = Registry(home, db_url).import_bundle(bundle)
    if as_json:
        return _echo_json(expert)
    console.print(f"imported expert [bold]{expert.id}[/] ({expert.seed}/{expert.ref}, team {expert.team})")


@experts_app.command("remove")
def experts_remove(expert_id: Annotated[int, typer.Argument(help="Expert id.")],
                   home: Home = None, db_url: DbUrl = None) -> None:
    """Remove an expert that no composition uses (its weights go at the next `xmerge gc`).

    Example: xmerge experts remove 7
    """
    with user_errors():
        expert = Registry(home, db_url).remove_expert(expert_id)
    console.print(f"removed expert {expert.id} ({expert.seed}/{expert.ref})")


@compositions_app.command("list")
def compositions_list(name: Annotated[str | None, typer.Option(help="Only versions of this name.")] = None,
                      home: Home = None, db_url: DbUrl = None, as_json: AsJson = False) -> None:
    """List compositions (every version).

    Example: xmerge compositions list --name team-mix
    """
    with user_errors():
        comps = Registry(home, db_url).list_compositions(name=name)
    if as_json:
        return _echo_json(comps)
    _table("compositions", ["id", "composition", "seed", "method", "members", "parent", "weights", "created"],
           [[c.id, c.ref, c.seed, c.method, ", ".join(f"{m.expert_id}:{m.weight:g}" for m in c.members),
             c.parent_id or "", _short(c.weights_sha), f"{c.created_at:%Y-%m-%d %H:%M}"] for c in comps])


@compositions_app.command("show")
def compositions_show(ref: Annotated[str, typer.Argument(help="Composition ref: NAME, NAME@vN or comp:NAME.")],
                      home: Home = None, db_url: DbUrl = None, as_json: AsJson = False) -> None:
    """Show one composition with its members and parameters.

    Example: xmerge compositions show team-mix@v3
    """
    with user_errors():
        comp = Registry(home, db_url).resolve(ref if ref.startswith("comp:") else f"comp:{ref}")
    if as_json:
        return _echo_json(comp)
    _show(f"composition {comp.ref}", comp)


@app.command("lineage")
def lineage_cmd(ref: Annotated[str, typer.Argument(help="Composition, expert or seed ref.")],
                home: Home = None, db_url: DbUrl = None, as_json: AsJson = False) -> None:
    """Show where a model comes from: composition -> operations -> experts -> seed -> teacher.

    Example: xmerge lineage team-mix@v3
    """
    with user_errors():
        tree = Registry(home, db_url).lineage(ref)
    if as_json:
        return _echo_json(tree)
    console.print(_rich_tree(tree))


def _rich_tree(node: dict, parent: Tree | None = None) -> Tree:
    d = node["details"]
    summary = {
        "composition": lambda: f"{d['method']} weights {_short(d['weights_sha'])}",
        "operation": lambda: f"{d['kind']} [{'green' if d['decision'] == 'accepted' else 'red'}]{d['decision']}[/]"
                             f" by {d['who']}",
        "expert": lambda: f"team {d['team']}, {d['status']}" + (f", weight {d['weight']:g}" if "weight" in d else ""),
        "seed": lambda: f"weights {_short(d['weights_sha'])}",
        "teacher": lambda: f"hash {_short(d['hash'])}",
    }[node["kind"]]()
    label = f"[bold]{node['kind']}[/] {node['ref']}  {summary}"
    branch = Tree(label) if parent is None else parent.add(label)
    for child in node["children"]:
        _rich_tree(child, branch)
    return branch


@app.command("gc")
def gc_cmd(grace: Annotated[float, typer.Option(help="Keep unreferenced files younger than this many seconds "
                                                     "(they may belong to a registration in progress).")] = 600.0,
           home: Home = None, db_url: DbUrl = None, as_json: AsJson = False) -> None:
    """Remove temp files of dead processes and blobs that no row references.

    Example: xmerge gc --grace 0
    """
    with user_errors():
        stats = Registry(home, db_url).gc(grace_s=grace)
    if as_json:
        return _echo_json(stats)
    console.print(f"removed {stats.temp_files} temp file(s) and {stats.blobs} blob(s), "
                  f"{stats.bytes_freed / 1e6:.1f} MB freed")
