"""Integrations with other libraries, each imported on its own so that none is a dependency:
``aioqueue.contrib.django`` (extra ``django``) and ``aioqueue.contrib.sqlalchemy`` (extra
``sqlalchemy``)."""
