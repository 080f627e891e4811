"""GET /v1/models and GET /v1/models/{id}."""

import openai
import pytest

from helpers import MINI, MINI_ALIAS, NANO, NANO_ALIAS, assert_error

ALL_IDS = {NANO, NANO_ALIAS, MINI, MINI_ALIAS}


def assert_model_object(model: dict) -> None:
    assert set(model) >= {"id", "object", "created", "owned_by"}, model
    assert model["object"] == "model", model
    assert isinstance(model["id"], str), model
    assert isinstance(model["created"], int) and not isinstance(model["created"], bool), model
    assert model["created"] >= 0, model
    assert isinstance(model["owned_by"], str) and model["owned_by"], model


def test_list_models_raw_shape(http):
    """GET /v1/models is a ListModelsResponse listing every tier id and every alias."""
    response = http.get("/v1/models")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["object"] == "list", body
    assert isinstance(body["data"], list), body
    for model in body["data"]:
        assert_model_object(model)
    ids = [model["id"] for model in body["data"]]
    assert set(ids) == ALL_IDS, ids
    assert len(ids) == len(set(ids)), f"duplicate ids: {ids}"


def test_list_models_sdk(client):
    """The SDK's models.list() parses the list and yields every id."""
    ids = {model.id for model in client.models.list()}
    assert ids == ALL_IDS


@pytest.mark.parametrize("model_id", sorted(ALL_IDS))
def test_retrieve_model(http, client, model_id):
    """GET /v1/models/{id} returns the Model for each tier id and alias."""
    response = http.get(f"/v1/models/{model_id}")
    assert response.status_code == 200, response.text
    assert_model_object(response.json())
    assert response.json()["id"] == model_id
    assert client.models.retrieve(model_id).id == model_id


def test_retrieve_unknown_model_is_404(http):
    """An unknown model id is a 404 invalid_request_error with code model_not_found."""
    response = http.get("/v1/models/gpt-9000")
    error = assert_error(response, 404, code="model_not_found")
    assert "gpt-9000" in error["message"]


def test_retrieve_unknown_model_sdk(client):
    """The SDK raises NotFoundError for an unknown model id."""
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("gpt-9000")
    assert caught.value.status_code == 404
    assert caught.value.code == "model_not_found"
