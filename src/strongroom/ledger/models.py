"""The chart of accounts. No framework, no SQL.

Accounts exist per merchant, mode and currency, and are created lazily: an account is a name
(`merchant_pending`, `processor_receivable:sandbox`) that comes into being with its first entry.
Amounts are signed minor units: a debit is positive, a credit negative, so a journal transaction
balances exactly when its entries sum to zero per currency.

  processor_receivable:<connector>  debit-normal   what the processor owes us for captured funds
  merchant_pending                  credit-normal  what we owe the merchant, not yet payable (never < 0)
  merchant_available                credit-normal  what we owe the merchant, payable; may go negative

Capture:    debit processor_receivable:<connector>, credit merchant_pending.
Refund:     debit merchant_available, credit processor_receivable:<connector>. As at Stripe,
            refunds are paid out of the available balance, never out of pending funds.
Fee:        debit merchant_pending, credit processor_receivable:<connector>: the processor keeps
            its fee out of the charge it settles (posted when the settlement report that states
            it is reconciled).
Settlement: debit merchant_pending, credit merchant_available: the charge's net (gross - fee)
            became payable on the report's `available_on`.
Authorizations without capture and voids move no money and post nothing.

So `merchant_pending` is exactly the captured-but-unsettled charges net of their fees, and never
negative. `merchant_available` may go negative, as a Stripe balance can: a refund issued before
its charge settled (or one that exceeds what is available) leaves the merchant owing it until
settlements cover it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Side(enum.StrEnum):
    DEBIT = "debit"
    CREDIT = "credit"


@dataclass(frozen=True)
class AccountType:
    name: str
    normal: Side
    # Declared never negative (in its normal direction); `post` refuses a posting that would.
    never_negative: bool


PROCESSOR_RECEIVABLE = AccountType("processor_receivable", Side.DEBIT, never_negative=False)
MERCHANT_PENDING = AccountType("merchant_pending", Side.CREDIT, never_negative=True)
MERCHANT_AVAILABLE = AccountType("merchant_available", Side.CREDIT, never_negative=False)

CHART = {t.name: t for t in (PROCESSOR_RECEIVABLE, MERCHANT_PENDING, MERCHANT_AVAILABLE)}
MERCHANT_ACCOUNTS = (MERCHANT_PENDING.name, MERCHANT_AVAILABLE.name)


def account_type(account: str) -> AccountType | None:
    """`processor_receivable:sandbox` → PROCESSOR_RECEIVABLE; None for a name outside the chart."""
    return CHART.get(account.split(":", 1)[0])


def receivable(connector: str) -> str:
    return f"{PROCESSOR_RECEIVABLE.name}:{connector}"


def normal_balance(account_type_: AccountType, signed_sum_minor: int) -> int:
    """The balance as the account's normal side reads it (a credit-normal account's credits are +)."""
    return signed_sum_minor if account_type_.normal is Side.DEBIT else -signed_sum_minor


@dataclass(frozen=True)
class Entry:
    account: str
    amount_minor: int  # debit > 0, credit < 0


class Kind(enum.StrEnum):
    CAPTURE = "capture"
    REFUND = "refund"
    FEE = "fee"
    SETTLE = "settle"


# What `/v1/balance_transactions` lists: a fee and a settlement show on their charge's transaction
# (its `fee`, `net`, `status` and `available_on`), as Stripe shows them.
LISTED_KINDS = (Kind.CAPTURE, Kind.REFUND)
