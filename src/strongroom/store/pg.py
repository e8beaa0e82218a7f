"""Hot statements on PostgreSQL, compiled once by SQLAlchemy and run straight on asyncpg: group
commit's batches (store.group) and the few autocommitted statements every payment runs
(`Database.fetch_one`/`execute_one`).

Through SQLAlchemy each statement pays again for an execution context, parameter and result
processing and a pool checkout, on each of the ~15 statements a payment runs. Here each
statement is compiled once (by SQLAlchemy, for this dialect) and then:

- a plain INSERT of N rows is ONE statement, `INSERT … SELECT * FROM unnest($1::t1[], …)`, with one
  array per column: one execution at the server however many rows;
- anything else (the UPDATEs by key, a SELECT) runs its compiled SQL, an executemany for N rows;
- a group commit's guards are one `… WHERE merchant_id = ANY($1) AND … FOR UPDATE`.

Values go through each column type's own bind processor, so what is stored is what SQLAlchemy
would have stored (JSON serialized by the engine's serializer, and so on). A statement this module
cannot translate exactly (RETURNING, ON CONFLICT, a default computed in Python, an expanding
parameter, duplicate result keys) is refused with `Untranslatable` at planning; callers then
take the SQLAlchemy path. Errors are asyncpg's own: group commit treats any failure of a batch as
"retry each unit alone" on the SQLAlchemy path, where the exceptions are the usual ones.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.sql import operators
from sqlalchemy.sql.elements import BinaryExpression, BindParameter, BooleanClauseList, Null

Processor = Callable[[Any], Any] | None


class Untranslatable(Exception):
    """This statement keeps the SQLAlchemy path."""


@dataclass(frozen=True)
class Plan:
    sql: str
    names: tuple[str, ...]  # parameter names in SQL order (per column for an unnest insert)
    constants: Mapping[str, Any]  # values for names the rows do not carry (scalar defaults, literals)
    processors: tuple[Processor, ...]
    unnest: bool  # one execution for N rows (column arrays, or one JSON document)
    columns: tuple[str, ...] = ()  # a SELECT's result keys, as SQLAlchemy's row mapping has them
    document: bool = False  # the rows as ONE JSON document parameter (see _insert_plan)
    where: bool = False  # the SQL ends in a WHERE clause (a condition is added with AND)
    types: tuple[str, ...] = ()  # a SELECT's parameter types, as SQL (what `batched` casts to)

    @property
    def parameters(self) -> int:
        return 1 if self.document else len(self.names)

    @functools.cached_property
    def _converted(self) -> tuple[tuple[int, str, Callable[[Any], Any]], ...]:
        """The parameters whose values go through a bind processor (most have none): position,
        name and processor."""
        return tuple(
            (n, name, proc) for n, (name, proc) in enumerate(zip(self.names, self.processors, strict=True)) if proc
        )

    def args(self, rows: Sequence[Mapping[str, Any]]) -> list[tuple[Any, ...]]:
        """The executemany argument tuples; for an unnest plan, one tuple: the column arrays, or
        the JSON document. A row's value for each name, else the plan's constant; a processor is
        not called for None (as SQLAlchemy's)."""
        names, constants, converted = self.names, self.constants, self._converted
        if self.document:
            # By name, for json_populate_recordset (a value per column; order does not matter).
            records = [{name: row[name] if name in row else constants[name] for name in names} for row in rows]
            for record in records:
                for _, name, proc in converted:
                    if (value := record[name]) is not None:
                        record[name] = proc(value)
            return [(orjson.dumps(records, option=orjson.OPT_NAIVE_UTC).decode(),)]
        values = [[row[name] if name in row else constants[name] for name in names] for row in rows]
        for row_values in values:
            for n, _, proc in converted:
                if (value := row_values[n]) is not None:
                    row_values[n] = proc(value)
        if not self.unnest:
            return [tuple(row_values) for row_values in values]
        return [tuple(list(column) for column in zip(*values, strict=True))]


_LENGTH = re.compile(r"\(\d+\)$")


def _array_type(column: sa.Column[Any], dialect: Dialect) -> str:
    # Without the length: an explicit cast to VARCHAR(n) would truncate a too-long value silently,
    # where the column's own assignment cast refuses it.
    return _LENGTH.sub("", column.type.compile(dialect=dialect)) + "[]"


def _processor(type_: sa.types.TypeEngine[Any], dialect: Dialect) -> Processor:
    proc: Processor = type_.dialect_impl(dialect).bind_processor(dialect)
    return proc


_PLANS: dict[tuple[int, tuple[str, ...]], tuple[sa.Executable, Plan]] = {}


def plan(statement: sa.Executable, keys: tuple[str, ...], dialect: Dialect) -> Plan:
    """The cached plan for `statement` executed with parameters named `keys`."""
    cache_key = (id(statement), keys)
    cached = _PLANS.get(cache_key)
    if cached is not None and cached[0] is statement:
        return cached[1]
    if _plain_insert(statement):
        built = _insert_plan(statement, keys, dialect)
    else:
        try:
            built = _update_plan(statement, keys, dialect)
        except Untranslatable:
            built = _compiled_plan(statement, keys, dialect)
    _PLANS[cache_key] = (statement, built)  # the statement is kept: its id stays unique
    return built


def _plain_insert(statement: sa.Executable) -> bool:
    return type(statement) is sa.Insert and not statement._returning and not statement._multi_values


def _insert_plan(statement: sa.Executable, keys: tuple[str, ...], dialect: Dialect) -> Plan:
    if not isinstance(statement, sa.Insert) or not isinstance(statement.table, sa.Table) or statement._values:
        raise Untranslatable(str(statement))
    table = statement.table
    constants: dict[str, Any] = {}
    for column in table.c:
        if column.key in keys or column.default is None:
            continue
        if not (isinstance(column.default, sa.ColumnDefault) and column.default.is_scalar):
            raise Untranslatable(f"{table.name}.{column.key} has a default computed in Python")
        constants[str(column.key)] = column.default.arg  # a plain str: it is a JSON key
    names = tuple(str(k) for k in keys) + tuple(constants)  # plain str: JSON keys (not quoted_name)
    unknown = [n for n in names if n not in table.c]
    if unknown:
        raise Untranslatable(f"{table.name} has no column {unknown}")
    columns = [table.c[n] for n in names]
    quote = dialect.identifier_preparer.quote
    name = dialect.identifier_preparer.format_table(table)
    listed = ", ".join(quote(c.name) for c in columns)
    # The rows as one JSON document, turned into rows of the table's own type by the server:
    # orjson encodes N x M values for a fraction of what asyncpg's column arrays cost the client,
    # for a little more work at the server (figures in docs/performance.md).
    # Each value still goes through its column type's input (a too-long VARCHAR is refused).
    # Identifiers and types come from the schema, quoted by the dialect; values are parameters.
    sql = (
        f"INSERT INTO {name} ({listed}) SELECT {listed} "  # noqa: S608
        f"FROM json_populate_recordset(NULL::{name}, $1::text::json)"
    )
    converters = tuple(_document_value(c.type, dialect) for c in columns)
    return Plan(sql, names, constants, converters, unnest=True, document=True)


def _document_value(type_: sa.types.TypeEngine[Any], dialect: Dialect) -> Processor:
    """How a value goes into the JSON document: JSON as itself (nested), bytes as bytea's hex
    input; the rest as orjson writes it (timestamps in RFC 3339 with their offset)."""
    impl = type_.dialect_impl(dialect)
    if isinstance(impl, sa.LargeBinary):
        return _bytea_hex
    return None


def _bytea_hex(value: Any) -> str:
    return "\\x" + bytes(value).hex()


def _update_plan(statement: sa.Executable, keys: tuple[str, ...], dialect: Dialect) -> Plan:
    """`UPDATE t SET … FROM unnest(…) AS v(…) WHERE t.k = v.k …`: N rows' updates in one execution,
    for an UPDATE whose WHERE is `column = :parameter` terms joined by AND (an update by key)."""
    if not isinstance(statement, sa.Update) or statement._returning or not isinstance(statement.table, sa.Table):
        raise Untranslatable(str(statement))
    table = statement.table
    where = statement.whereclause
    terms = (
        list(where.clauses) if isinstance(where, BooleanClauseList) and where.operator is operators.and_ else [where]
    )
    matches: list[tuple[sa.Column[Any], str]] = []
    for term in terms:
        if not (
            isinstance(term, BinaryExpression)
            and term.operator is operators.eq
            and isinstance(term.left, sa.Column)
            and term.left.table is table
            and isinstance(term.right, BindParameter)
            and term.right.key in keys
        ):
            raise Untranslatable(str(statement))
        matches.append((term.left, term.right.key))
    sets: list[tuple[sa.Column[Any], str]] = []
    constants: dict[str, Any] = {}
    used = {name for _, name in matches}
    for target, value in (statement._values or {}).items():
        column = table.c[getattr(target, "key", target)]
        if isinstance(value, BindParameter) and value.key in keys:
            sets.append((column, value.key))
            used.add(value.key)
        elif isinstance(value, BindParameter) and value.callable is None and not value.required:
            constants[f"_set_{column.key}"] = value.value
            sets.append((column, f"_set_{column.key}"))
        elif isinstance(value, Null):
            constants[f"_set_{column.key}"] = None
            sets.append((column, f"_set_{column.key}"))
        else:
            raise Untranslatable(str(statement))
    for key in keys:
        if key not in used:
            if key not in table.c:
                raise Untranslatable(f"{table.name} has no column {key}")
            sets.append((table.c[key], key))
    if not sets:
        raise Untranslatable(str(statement))
    columns = [*sets, *matches]
    quote = dialect.identifier_preparer.quote
    name = dialect.identifier_preparer.format_table(table)
    arrays = ", ".join(f"${i}::{_array_type(c, dialect)}" for i, (c, _) in enumerate(columns, start=1))
    aliases = ", ".join(f"v{i}" for i in range(len(columns)))
    assignments = ", ".join(f"{quote(c.name)} = v.v{i}" for i, (c, _) in enumerate(sets))
    # Each key column also as `= ANY(its array)`: an index condition whatever the row estimates.
    # With the join alone, a generic plan made while the table was small keeps a sequential scan
    # per batch as the table grows.
    conditions = " AND ".join(
        f"{name}.{quote(c.name)} = ANY(${n}::{_array_type(c, dialect)}) AND {name}.{quote(c.name)} = v.v{n - 1}"
        for n, (c, _) in enumerate(matches, start=len(sets) + 1)
    )
    # Identifiers and types come from the schema, quoted by the dialect; values are parameters.
    sql = f"UPDATE {name} SET {assignments} FROM unnest({arrays}) AS v({aliases}) WHERE {conditions}"  # noqa: S608
    processors = tuple(_processor(c.type, dialect) for c, _ in columns)
    return Plan(sql, tuple(n for _, n in columns), constants, processors, unnest=True, where=True)


_COMBINED: dict[tuple[int, ...], tuple[tuple[Plan, ...], str]] = {}
_PARAMETER = re.compile(r"\$(\d+)")


def combined(plans: Sequence[Plan]) -> str:
    """One statement running every unnest plan as a data-modifying WITH query: a whole batch in
    one execution (and, alone, one implicit transaction: no BEGIN or COMMIT round trips). The rows
    the plans touch are distinct (each unit its own), which is what such queries need: they all
    see one snapshot and run in no set order."""
    cache_key = tuple(id(p) for p in plans)
    cached = _COMBINED.get(cache_key)
    if cached is not None and all(a is b for a, b in zip(cached[0], plans, strict=True)):
        return cached[1]
    parts, offset = [], 0
    for n, one in enumerate(plans):
        if not one.unnest:
            raise Untranslatable(one.sql)
        parts.append(f"w{n} AS ({_PARAMETER.sub(functools.partial(_shifted, offset), one.sql)})")
        offset += one.parameters
    sql = "WITH " + ", ".join(parts) + " SELECT 1"
    _COMBINED[cache_key] = (tuple(plans), sql)
    return sql


def _shifted(offset: int, match: re.Match[str]) -> str:
    return f"${int(match.group(1)) + offset}"


def _compiled_plan(statement: sa.Executable, keys: tuple[str, ...], dialect: Dialect) -> Plan:
    if isinstance(statement, sa.Select):
        columns = tuple(statement.selected_columns.keys())
        if len(set(columns)) != len(columns):
            raise Untranslatable(str(statement))
    elif isinstance(statement, sa.Update | sa.Delete | sa.Insert) and not statement._returning:
        columns = ()
    else:
        raise Untranslatable(str(statement))
    compiled = statement.compile(dialect=dialect, column_keys=list(keys))
    # Values SQLAlchemy would compute in Python at execution (defaults), or fetch afterwards.
    computed = compiled.insert_prefetch or compiled.update_prefetch or getattr(compiled, "postfetch", None)
    if computed or compiled.positiontup is None:
        raise Untranslatable(str(statement))
    constants: dict[str, Any] = {}
    processors = []
    types = []
    for name in compiled.positiontup:
        bind = compiled.binds[name]
        if bind.expanding or bind.callable is not None:
            raise Untranslatable(str(statement))
        if name not in keys:
            if bind.required:
                raise Untranslatable(f"parameter {name} is missing")
            constants[name] = bind.value
        processors.append(_processor(bind.type, dialect))
        types.append(_sql_type(bind.type, dialect))
    return Plan(
        compiled.string,
        tuple(compiled.positiontup),
        constants,
        tuple(processors),
        False,
        columns,
        types=tuple(types) if columns and all(types) else (),
    )


def _sql_type(type_: sa.types.TypeEngine[Any], dialect: Dialect) -> str:
    """The parameter's type as SQL, without a length (see _array_type); "" if it has none."""
    try:
        return _LENGTH.sub("", type_.compile(dialect=dialect))
    except sa.exc.CompileError:
        return ""


@dataclass(frozen=True)
class BatchedSelect:
    sql: str
    plan: Plan

    def args(self, rows: Sequence[Mapping[str, Any]]) -> tuple[list[Any], ...]:
        """One array per parameter, the rows' values in order."""
        return tuple(list(column) for column in zip(*self.plan.args(rows), strict=True))


_BATCHED: dict[int, tuple[Plan, BatchedSelect]] = {}


def batched(plan: Plan) -> BatchedSelect | None:
    """A SELECT by parameters for N parameter sets in ONE execution: the parameters as arrays,
    unnested WITH ORDINALITY, and the SELECT run per set (LATERAL, an index lookup each for a
    select by key). Each row comes back with its set's ordinal (from 1) as its first column.
    None for a plan that is not a SELECT or whose parameter types are not known."""
    cached = _BATCHED.get(id(plan))
    if cached is not None and cached[0] is plan:
        return cached[1]
    if not plan.types or not plan.columns:
        return None
    arrays = ", ".join(f"${n}::{t}[]" for n, t in enumerate(plan.types, start=1))
    names = ", ".join(f"_p{n}" for n in range(1, len(plan.types) + 1))
    inner = _PARAMETER.sub(lambda m: f"_v._p{m.group(1)}", plan.sql)
    # LIMIT 1 (the first row, as fetchrow takes it) also keeps the SELECT a subquery run per set:
    # without it PostgreSQL may join it to the sets as a whole. On the benchmark's database (one
    # merchant) the generic plan read every card of the DEK and every payment method of the
    # merchant per batch (pg_stat_user_indexes: 65 and 49 index entries per scan, 13.5 per
    # payment); with it, one entry per lookup. (Not reproduced on a small table in a test.)
    # The SELECT is this module's own compiled statement; values are parameters.
    sql = (
        f"SELECT _v._ord, _r.* FROM unnest({arrays}) WITH ORDINALITY AS _v({names}, _ord) "  # noqa: S608
        f"CROSS JOIN LATERAL (SELECT * FROM ({inner}) AS _q LIMIT 1) AS _r"
    )
    built = BatchedSelect(sql, plan)
    _BATCHED[id(plan)] = (plan, built)
    return built


@dataclass(frozen=True)
class GuardPlan:
    sql: str
    types: tuple[str, str, str]


_GUARDS: dict[tuple[sa.Table, tuple[str, ...]], GuardPlan] = {}


def guard_plan(table: sa.Table, columns: tuple[str, ...], dialect: Dialect) -> GuardPlan:
    """Lock and read the guarded rows of `table`, in a fixed order (no deadlock between batches)."""
    cached = _GUARDS.get((table, columns))
    if cached is not None:
        return cached
    quote = dialect.identifier_preparer.quote
    key = ("merchant_id", "livemode", "id")
    selected = ", ".join(quote(c) for c in (*key, *columns))
    name = dialect.identifier_preparer.format_table(table)
    types = (
        _array_type(table.c.merchant_id, dialect),
        _array_type(table.c.livemode, dialect),
        _array_type(table.c.id, dialect),
    )
    # `= ANY` on each key column, not a row IN (unnest): the planner reads that as a semi-join and
    # chooses a sequential scan of the whole table for every batch, a cost growing with the table.
    # This is an index scan of the primary key; a row matching the columns separately but not as a
    # triple is never asked for (ids are unique), and the caller matches triples exactly anyway.
    # Identifiers and types come from the schema, quoted by the dialect; values are parameters.
    sql = (
        f"SELECT {selected} FROM {name} WHERE {quote('merchant_id')} = ANY($1::{types[0]}) "  # noqa: S608
        f"AND {quote('livemode')} = ANY($2::{types[1]}) AND {quote('id')} = ANY($3::{types[2]}) "
        f"ORDER BY {quote('merchant_id')}, {quote('id')} FOR UPDATE"
    )
    built = GuardPlan(sql, types)
    _GUARDS[(table, columns)] = built
    return built


_GUARDED: dict[tuple[sa.Table, tuple[str, ...], tuple[int, ...]], tuple[tuple[Plan, ...], GuardedPlan]] = {}


@dataclass(frozen=True)
class GuardedPlan:
    """A guarded batch as ONE statement: the guarded rows locked and checked, and every write
    made only if every guard held (see `guarded`)."""

    sql: str
    processors: tuple[Processor, ...]  # of the expected columns' values

    def args(
        self, guards: Sequence[tuple[str, bool, str, Mapping[str, Any]]], columns: tuple[str, ...]
    ) -> tuple[Any, ...]:
        values = [[g[0] for g in guards], [g[1] for g in guards], [g[2] for g in guards]]
        for column, proc in zip(columns, self.processors, strict=True):
            values.append([_processed(g[3][column], proc) for g in guards])
        return tuple(values)


def _processed(value: Any, proc: Processor) -> Any:
    return value if proc is None or value is None else proc(value)


def guarded(table: sa.Table, columns: tuple[str, ...], plans: Sequence[Plan], dialect: Dialect) -> GuardedPlan:
    """`combined` behind a guard, in one statement and so one implicit transaction: no BEGIN, no
    separate locking read, no COMMIT round trip. The `_guard` query locks (FOR UPDATE, in key
    order, as `guard_plan`) the rows of `table` that still hold their expected `columns` values;
    each write runs only if that found every guarded row. The statement returns the rows found:
    fewer than asked means nothing was written (a caller then sorts the units out the usual way).

    Concurrent changes: a row changed and committed since the statement's snapshot is locked in
    its newest version and checked again (READ COMMITTED's re-check of FOR UPDATE), so a guard
    never passes on a version that is not the latest; the writes then act on rows this statement
    holds locked."""
    cache_key = (table, columns, tuple(id(p) for p in plans))
    cached = _GUARDED.get(cache_key)
    if cached is not None and all(a is b for a, b in zip(cached[0], plans, strict=True)):
        return cached[1]
    quote = dialect.identifier_preparer.quote
    name = dialect.identifier_preparer.format_table(table)
    key = ("merchant_id", "livemode", "id")
    checked = [table.c[c] for c in (*key, *columns)]
    arrays = ", ".join(f"${n}::{_array_type(c, dialect)}" for n, c in enumerate(checked, start=1))
    aliases = ", ".join(f"v{n}" for n in range(len(checked)))
    conditions = [
        f"_t.{quote(c.name)} = ANY(${n + 1}::{_array_type(c, dialect)}) AND _t.{quote(c.name)} = v.v{n}"
        for n, c in enumerate(checked[:3])
    ]
    conditions += [f"_t.{quote(c.name)} IS NOT DISTINCT FROM v.v{n}" for n, c in enumerate(checked) if n >= 3]
    listed = ", ".join(f"_t.{quote(k)}" for k in key)
    # Identifiers and types come from the schema, quoted by the dialect; values are parameters.
    guard = (
        f"_guard AS (SELECT {listed} FROM {name} AS _t, unnest({arrays}) AS v({aliases}) "  # noqa: S608
        f"WHERE {' AND '.join(conditions)} "
        f"ORDER BY _t.{quote('merchant_id')}, _t.{quote('id')} FOR UPDATE OF _t)"
    )
    gate = f"(SELECT count(*) FROM _guard) = cardinality($3::{_array_type(table.c.id, dialect)})"  # noqa: S608
    parts, offset = [guard], len(checked)
    for n, one in enumerate(plans):
        if not one.unnest:
            raise Untranslatable(one.sql)
        sql = _PARAMETER.sub(functools.partial(_shifted, offset), one.sql)
        parts.append(f"w{n} AS ({sql} {'AND' if one.where else 'WHERE'} {gate})")
        offset += one.parameters
    selected = ", ".join(quote(k) for k in key)
    built = GuardedPlan(
        "WITH " + ", ".join(parts) + f" SELECT {selected} FROM _guard",  # noqa: S608
        tuple(_processor(c.type, dialect) for c in checked[3:]),
    )
    _GUARDED[cache_key] = (tuple(plans), built)
    return built
