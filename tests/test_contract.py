"""Searcher, ShardedSearcher, the HTTP Backend and the HTTP client all honour serving.contract.SearchService."""

from __future__ import annotations

import inspect

import pytest

from serving.backend import Backend
from serving.client import SearchClient
from serving.contract import SearchService
from serving.searcher import Searcher, ShardedSearcher

IMPLEMENTATIONS = [Searcher, ShardedSearcher, Backend, SearchClient]
OPERATIONS = [name for name, member in vars(SearchService).items()
              if callable(member) and not name.startswith("_")]


def _shape(function: object) -> list[tuple[str, object, object]]:
    """(name, kind, default) of each parameter: what a caller relies on (annotations are not compared)."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]


def test_the_contract_names_the_shared_operations() -> None:
    assert sorted(OPERATIONS) == ["delete", "get_document", "search", "search_batch", "similarity", "upsert"]


@pytest.mark.parametrize("cls", IMPLEMENTATIONS, ids=lambda c: c.__name__)
def test_each_implementation_structurally_satisfies_the_contract(cls: type) -> None:
    assert issubclass(cls, SearchService)


@pytest.mark.parametrize("cls", IMPLEMENTATIONS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("operation", OPERATIONS)
def test_each_operation_takes_the_contracts_parameters(cls: type, operation: str) -> None:
    assert _shape(getattr(cls, operation)) == _shape(getattr(SearchService, operation))


def test_instances_satisfy_the_contract(tmp_path) -> None:
    with SearchClient("http://127.0.0.1:9") as client:
        assert isinstance(client, SearchService)
    assert isinstance(Backend(tmp_path, watch_interval=0), SearchService)
    assert not isinstance(object(), SearchService)


@pytest.mark.parametrize("cls", IMPLEMENTATIONS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("operation", ["search", "search_batch"])
def test_every_search_takes_rerank_as_a_keyword_defaulting_to_no_reranking(cls: type, operation: str) -> None:
    parameter = inspect.signature(getattr(cls, operation)).parameters["rerank"]
    assert (parameter.kind, parameter.default) == (inspect.Parameter.KEYWORD_ONLY, 0)
    assert list(inspect.signature(getattr(cls, operation)).parameters)[-2:] == ["mode", "rerank"]
