"""The preference store's tables (SQLModel). Alembic migrations in graph_service/migrations create them.

Keys are content hashes (sha256 hex) rather than autoincrement ids: an ingester can compute every key
itself, so a batch is four INSERT ... ON CONFLICT DO NOTHING statements with no lookups, the same
record twice is stored once, and concurrent ingesters of overlapping files cannot double anything.

Times are timezone-aware UTC.
"""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, Text, func
from sqlmodel import Field, SQLModel

HASH_LEN = 64  # sha256 hex


class User(SQLModel, table=True):
    __tablename__ = "users"
    id: str = Field(primary_key=True, max_length=128)  # the external user_id
    group: str | None = Field(default=None, max_length=64)
    created_at: datetime = Field(sa_type=DateTime(timezone=True), index=True)  # first time a preference of this user was stored


class Prompt(SQLModel, table=True):
    __tablename__ = "prompts"
    id: str = Field(primary_key=True, max_length=HASH_LEN)
    text: str = Field(sa_type=Text)


class Response(SQLModel, table=True):
    __tablename__ = "responses"
    id: str = Field(primary_key=True, max_length=HASH_LEN)
    text: str = Field(sa_type=Text)


class Preference(SQLModel, table=True):
    __tablename__ = "preferences"
    __table_args__ = {"sqlite_with_rowid": False}
    # sha256 of (user_id, prompt id, chosen id, rejected id): the record's identity.
    id: str = Field(primary_key=True, max_length=HASH_LEN)
    user_id: str = Field(foreign_key="users.id", index=True, max_length=128)
    prompt_id: str = Field(foreign_key="prompts.id", max_length=HASH_LEN)
    chosen_id: str = Field(foreign_key="responses.id", max_length=HASH_LEN)
    rejected_id: str = Field(foreign_key="responses.id", max_length=HASH_LEN)
    controversial: bool | None = None
    created_at: datetime = Field(sa_type=DateTime(timezone=True))
    # When the store received the record, by the database's clock (created_at is the client's): the graph
    # service polls it to see which users got new preferences, through any replica (migration 0002).
    stored_at: datetime | None = Field(default=None, sa_type=DateTime(timezone=True), index=True, nullable=False,
                                       sa_column_kwargs={"server_default": func.current_timestamp()})
