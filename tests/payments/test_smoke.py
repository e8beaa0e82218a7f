from tests.factories import create_intent, paid_intent


async def test_automatic_capture_payment_succeeds_and_is_listed(api):
    intent = await paid_intent(api)
    assert intent["status"] == "succeeded"
    assert intent["amount_received"] == 2000
    listed = (await api.get("/v1/payment_intents", params={"limit": 1})).json()
    assert listed["data"][0]["id"] == intent["id"]


async def test_unknown_parameter_is_rejected_naming_it(api):
    body = await create_intent(api, expect=400, bogus="1")
    assert body["error"]["param"] == "bogus"
