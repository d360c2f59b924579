"""A producer process for the acceptance tests: emits events, prints their ids as JSON."""

import sys

import orjson
import psycopg

from outbox_relay import Producer


def main() -> None:
    database_url, schema, prefix, execution_id, count = sys.argv[1:6]
    producer = Producer(schema=schema, subject_prefix=prefix)
    ids = []
    with psycopg.connect(database_url) as conn:
        for i in range(int(count)):
            with conn.transaction():
                ids.append(
                    producer.emit_event(
                        conn,
                        event_type=("command.issued", "command.completed")[i % 2],
                        execution_id=int(execution_id),
                        node_name=f"step-{i}",
                        context={"i": i},
                    )
                )
    sys.stdout.write(orjson.dumps(ids).decode())


if __name__ == "__main__":
    main()
