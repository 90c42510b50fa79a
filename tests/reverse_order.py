"""A pytest plugin that runs the collected tests in reverse order, to show the suite does not depend on order:
``python -m pytest -q -p no:randomly -p tests.reverse_order``."""


def pytest_collection_modifyitems(session, config, items):
    items.reverse()
