from tests.factories import create_intent, paid_intent


async def test_metadata_and_description_can_be_updated_after_success(api):
    intent = await paid_intent(api)
    response = await api.post(
        f"/v1/payment_intents/{intent['id']}", data={"metadata[order]": "42", "description": "Order 42"}
    )
    assert response.status_code == 200, response.text
    assert response.json()["metadata"] == {"order": "42"}
    assert response.json()["description"] == "Order 42"
    assert response.json()["amount_received"] == intent["amount_received"]


async def test_amount_cannot_change_after_success_and_nothing_changes(api):
    intent = await paid_intent(api)
    response = await api.post(f"/v1/payment_intents/{intent['id']}", data={"amount": "5000", "metadata[a]": "b"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "payment_intent_unexpected_state"
    after = (await api.get(f"/v1/payment_intents/{intent['id']}")).json()
    assert after["amount"] == 2000
    assert after["metadata"] == {}


async def test_return_url_is_handed_back_in_the_3ds_redirect(api):
    intent = await create_intent(
        api, payment_method="pm_card_threeDSecureRequired", confirm="true", return_url="https://shop.example/done"
    )
    assert intent["status"] == "requires_action"
    assert intent["next_action"]["redirect_to_url"]["return_url"] == "https://shop.example/done"


async def test_non_integer_amount_reports_parameter_invalid_integer(api):
    body = await create_intent(api, expect=400, amount="12.5")
    assert body["error"]["param"] == "amount"
    assert body["error"]["code"] == "parameter_invalid_integer"
