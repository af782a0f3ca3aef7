"""Database faults against errors of the data, told without the data (db/errors.py)."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine, create_engine, insert, text
from sqlalchemy.exc import DBAPIError

from kamiyo.db.errors import describe, is_database_fault
from kamiyo.db.models import users_table


def _raised(engine: Engine, statement: object, parameters: object = None) -> DBAPIError:
    with pytest.raises(DBAPIError) as caught, engine.begin() as connection:
        connection.execute(statement, parameters)  # type: ignore[call-overload]
    return caught.value


def test_a_duplicate_key_is_the_datas_error_and_is_told_without_the_value(engine: Engine) -> None:
    row = {"email": "private.person@example.com", "subscription_tier": "free"}
    with engine.begin() as connection:
        connection.execute(insert(users_table), row)
    error = _raised(engine, insert(users_table), row)
    assert not is_database_fault(error)
    told = describe(error)
    assert told.startswith("IntegrityError: ")
    assert "private.person" not in told
    assert "INSERT" not in told
    assert "\n" not in told


def test_a_missing_table_is_a_fault_of_the_database(engine: Engine) -> None:
    error = _raised(engine, text("SELECT * FROM no_such_table"))
    assert is_database_fault(error)
    assert "SELECT" not in describe(error)


def test_an_unreachable_postgresql_is_a_fault_of_the_database() -> None:
    engine = create_engine("postgresql+psycopg://nobody@127.0.0.1:1/none", connect_args={"connect_timeout": 2})
    with pytest.raises(DBAPIError) as caught:
        engine.connect()
    assert is_database_fault(caught.value)
    assert describe(caught.value).startswith("OperationalError: ")


def test_a_locked_sqlite_database_is_a_fault_of_the_database(tmp_path: object) -> None:
    path = f"{tmp_path}/locked.db"
    holder = create_engine(f"sqlite:///{path}", connect_args={"timeout": 0})
    waiter = create_engine(f"sqlite:///{path}", connect_args={"timeout": 0})
    with holder.connect() as held:
        held.exec_driver_sql("CREATE TABLE t (x INTEGER)")
        held.commit()
        held.exec_driver_sql("INSERT INTO t VALUES (1)")  # the write lock, held
        error = _raised(waiter, text("INSERT INTO t VALUES (2)"))
    assert is_database_fault(error)
    assert describe(error) == "OperationalError: database is locked"
