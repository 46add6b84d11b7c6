"""The tables, as peewee models, and the schema's versions.

``database`` is a ``DatabaseProxy``: ``imserver.db.init_app`` points it at
SQLite or PostgreSQL from ``DATABASE_URL`` (the one process-wide object, as
peewee's docs advise).

- ``User``: an account, with its inbox counters: ``last_seq`` (the seq of its
  newest inbox entry) and ``acked_seq`` (the cursor: every entry up to it is
  acknowledged). Keeping ``last_seq`` here makes the next seq one
  ``UPDATE ... RETURNING``, dense and strictly increasing even when many
  processes write to one user (the row lock orders them).
- ``Message``: stored once, whatever the number of recipients; ``(sender,
  cid)`` is unique so that a resent ``cid`` answers the same message.
- ``Inbox``: one entry per recipient: ``(user, seq) -> message``.
- ``Group`` and ``GroupMember``.
- ``SchemaVersion``: the version of the schema in this database.

Imports: peewee only.
"""

import peewee

database = peewee.DatabaseProxy()

# Bump when the schema changes, and add a step to MIGRATIONS in db.py.
# 2: no single-column index on a foreign key that a composite index starts
#    with, and one index for direct history instead of two mirror images
#    (each was written on every insert and read by no query).
SCHEMA_VERSION = 2


class BaseModel(peewee.Model):
    class Meta:
        database = database


class User(BaseModel):
    id = peewee.BigAutoField()
    username = peewee.CharField(max_length=32, unique=True)
    password_hash = peewee.CharField(max_length=255)
    is_admin = peewee.BooleanField(default=False)
    created_at = peewee.BigIntegerField()
    last_seq = peewee.BigIntegerField(default=0)
    acked_seq = peewee.BigIntegerField(default=0)

    class Meta:
        table_name = "users"


class Group(BaseModel):
    id = peewee.BigAutoField()
    name = peewee.CharField(max_length=64)
    owner = peewee.ForeignKeyField(User, backref="owned_groups")
    created_at = peewee.BigIntegerField()

    class Meta:
        table_name = "groups"


class GroupMember(BaseModel):
    # No index of their own: the primary key starts with group, the unique
    # index below with user.
    group = peewee.ForeignKeyField(Group, backref="members", on_delete="CASCADE",
                                   index=False)
    user = peewee.ForeignKeyField(User, backref="memberships", index=False)
    joined_at = peewee.BigIntegerField()
    # The newest message id when the member joined: its group history starts
    # after it, as its inbox does.
    since_id = peewee.BigIntegerField(default=0)

    class Meta:
        table_name = "group_members"
        primary_key = peewee.CompositeKey("group", "user")
        indexes = ((("user", "group"), True),)


class Message(BaseModel):
    id = peewee.BigAutoField()
    # The foreign keys have no index of their own: each composite index
    # below starts with one of them, and every insert writes every index.
    sender = peewee.ForeignKeyField(User, backref="sent_messages", index=False)
    # Exactly one of recipient and group is set.
    recipient = peewee.ForeignKeyField(User, null=True, backref="received_messages",
                                       index=False)
    group = peewee.ForeignKeyField(Group, null=True, backref="messages", index=False)
    body = peewee.TextField()
    ts = peewee.BigIntegerField()
    cid = peewee.CharField(max_length=64, null=True)

    class Meta:
        table_name = "messages"
        indexes = (
            # Idempotent cid: one message per (sender, cid).
            (("sender", "cid"), True),
            # History between two users, newest first: both directions of
            # a conversation read this one index.
            (("recipient", "sender", "id"), False),
            # Group history, newest first.
            (("group", "id"), False),
        )


class Inbox(BaseModel):
    # The primary key (user, seq) serves every read; messages are never
    # deleted, so nothing looks entries up by message.
    user = peewee.ForeignKeyField(User, backref="inbox", index=False)
    seq = peewee.BigIntegerField()
    message = peewee.ForeignKeyField(Message, index=False)

    class Meta:
        table_name = "inbox"
        primary_key = peewee.CompositeKey("user", "seq")


class SchemaVersion(BaseModel):
    version = peewee.IntegerField()

    class Meta:
        table_name = "schema_version"


MODELS = [User, Group, GroupMember, Message, Inbox, SchemaVersion]
