import re

import pytest

from outbox_relay.errors import ConfigError
from outbox_relay.queries import Names, _named_queries, query
from outbox_relay.schema import migrations

HOSTILE = ['we"ird', "Robert'); DROP TABLE students;--", "spa ce", "ünï"]


def test_every_named_query_renders() -> None:
    names = Names("noetl")
    extra = {"columns", "values", "filter", "role", "ordering_key", "pid", "is_relay"}
    for name in _named_queries():
        text = _named_queries()[name]
        needed = set(re.findall(r"(?<!\{)\{(\w+)\}(?!\})", text))
        assert needed - extra <= set(names.identifiers()), name
        if not needed & extra:
            query(name, names).as_string()


@pytest.mark.parametrize("schema", HOSTILE)
def test_hostile_schema_names_are_quoted(schema: str) -> None:
    rendered = query("claim_batch", Names(schema)).as_string()
    quoted = '"' + schema.replace('"', '""') + '"'
    assert f'{quoted}."event_outbox"' in rendered


def test_migrations_are_numbered_from_one_without_gaps() -> None:
    versions = [m.version for m in migrations()]
    assert versions == list(range(1, len(versions) + 1))


def test_schema_names_too_long_for_postgres_are_refused() -> None:
    with pytest.raises(ConfigError):
        Names("s" * 40)


@pytest.mark.parametrize("schema", ["a$$b", "$x"])
def test_dollar_signs_are_refused_as_they_would_end_a_function_body(schema: str) -> None:
    with pytest.raises(ConfigError, match=r"must not contain '\$'"):
        Names(schema)


@pytest.mark.parametrize("schema", ["a%b", "%(x)s"])
def test_percent_signs_are_refused_as_queries_would_read_a_placeholder(schema: str) -> None:
    with pytest.raises(ConfigError, match="must not contain '%'"):
        Names(schema)
