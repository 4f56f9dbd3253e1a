"""The sandbox's business-partner addresses and tax numbers.

Internal: used by `adapters.erp_cloud._sandbox_partners` only. Keeps the
addresses and tax numbers a partner's deep insert brings (stamped with the
partner's number; addresses numbered ``"1"``, ``"2"``, … as SAP's address
number range would), hands them to a partner read that expands them, and
serves ``A_BusinessPartnerAddress`` and ``A_BusinessPartnerTaxNumber``: read
one or many, create, and PATCH with ``If-Match`` (each entity has its own
ETag). Refused as SAP refuses them: a country key that is not 2 or 3 upper-case
letters, a second tax number of one category, a tax number without category
or number, and an address or tax number of a partner that does not exist.
``PostalCode``, ``Region`` and the tax numbers are kept upper case, as SAP
keeps them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import TYPE_CHECKING, TypeVar

import msgspec
from aiohttp import web

from adapters.erp_cloud import _odata as od
from adapters.erp_cloud.views import (
    A_BusinessPartner,
    A_BusinessPartnerAddress,
    A_BusinessPartnerTaxNumber,
    ErrorDetail,
    Metadata,
    Navigation,
    expanded,
)

if TYPE_CHECKING:
    from adapters.erp_cloud.sandbox import Counters

__all__ = ["PartnerDetails", "ADDRESS", "TAX_NUMBER"]

E = TypeVar("E", A_BusinessPartnerAddress, A_BusinessPartnerTaxNumber)
_BP = "API_BUSINESS_PARTNER"

ADDRESS = od.EntitySpec(
    set_name="A_BusinessPartnerAddress",
    type_name=f"{_BP}.A_BusinessPartnerAddressType",
    keys=("BusinessPartner", "AddressID"),
    view=A_BusinessPartnerAddress,
)
TAX_NUMBER = od.EntitySpec(
    set_name="A_BusinessPartnerTaxNumber",
    type_name=f"{_BP}.A_BusinessPartnerTaxNumberType",
    keys=("BusinessPartner", "BPTaxType"),
    view=A_BusinessPartnerTaxNumber,
)

_ADDRESS_UPDATABLE = frozenset(
    {
        "StreetName",
        "HouseNumber",
        "CityName",
        "PostalCode",
        "Region",
        "Country",
        "Language",
    }
)
_TAX_UPDATABLE = frozenset({"BPTaxNumber", "BPTaxLongNumber"})
_COUNTRY = re.compile(r"[A-Z]{2,3}")

#: Partner number → address number → address.
Addresses = dict[str, dict[str, od.Record[A_BusinessPartnerAddress]]]
#: Partner number → tax number category → tax number.
TaxNumbers = dict[str, dict[str, od.Record[A_BusinessPartnerTaxNumber]]]


class PartnerDetails:
    """Addresses and tax numbers of business partners, in memory.

    *exists* tells whether a partner number is known (alpha-converted).
    """

    def __init__(
        self, *, counters: Counters, clock: od.Clock, exists: Callable[[str], bool]
    ) -> None:
        self._counters = counters
        self._clock = clock
        self._exists = exists
        self.addresses: Addresses = {}
        self.tax_numbers: TaxNumbers = {}
        self._next_address = 1

    # -- with the partner --------------------------------------------------------

    def problems(self, partner: A_BusinessPartner) -> list[ErrorDetail]:
        """What is wrong with the addresses and tax numbers of a deep insert."""
        found: list[ErrorDetail] = []
        for index, address in enumerate(expanded(partner.to_BusinessPartnerAddress)):
            where = f"A_BusinessPartner/to_BusinessPartnerAddress({index + 1})"
            found.extend(_address_problems(address.Country, where))
        seen: set[str] = set()
        for index, tax in enumerate(expanded(partner.to_BusinessPartnerTax)):
            where = f"A_BusinessPartner/to_BusinessPartnerTax({index + 1})"
            found.extend(_tax_problems(tax, where))
            if tax.BPTaxType and tax.BPTaxType.upper() in seen:
                found.append(_duplicate(tax.BPTaxType, "the new partner", where))
            seen.add((tax.BPTaxType or "").upper())
        return found

    def add(self, number: str, partner: A_BusinessPartner, now: datetime) -> None:
        """Keep the addresses and tax numbers *partner*'s deep insert brought."""
        for address in expanded(partner.to_BusinessPartnerAddress):
            self._store_address(number, address, now)
        for tax in expanded(partner.to_BusinessPartnerTax):
            self._store_tax_number(number, tax, now)

    def join(self, partner: A_BusinessPartner) -> A_BusinessPartner:
        """*partner* with its addresses and tax numbers, each with its ETag."""
        number = partner.BusinessPartner or ""
        return msgspec.structs.replace(
            partner,
            to_BusinessPartnerAddress=Navigation(
                results=_stamped(self.addresses.get(number, {}).values())
            ),
            to_BusinessPartnerTax=Navigation(
                results=_stamped(self.tax_numbers.get(number, {}).values())
            ),
        )

    # -- their own entity sets ---------------------------------------------------

    async def route(
        self,
        request: web.Request,
        *,
        entity_set: str,
        key: str | None,
        method: str,
        base: str,
    ) -> web.StreamResponse | None:
        """Answer a request for one of the two entity sets; None if not one."""
        reading = method in ("GET", "HEAD")
        match (entity_set, key is None):
            case ("A_BusinessPartnerAddress", True) if method == "POST":
                return await self._create_address(request, base)
            case ("A_BusinessPartnerAddress", True) if reading:
                return od.read_many(request, base, ADDRESS, _flat(self.addresses))
            case ("A_BusinessPartnerAddress", False) if method == "PATCH":
                found = _find(self.addresses, key, "Address")
                return await self._patch_address(request, found)
            case ("A_BusinessPartnerAddress", False) if reading:
                found = _find(self.addresses, key, "Address")
                return od.read_one(request, base, ADDRESS, found)
            case ("A_BusinessPartnerTaxNumber", True) if method == "POST":
                return await self._create_tax_number(request, base)
            case ("A_BusinessPartnerTaxNumber", True) if reading:
                return od.read_many(request, base, TAX_NUMBER, _flat(self.tax_numbers))
            case ("A_BusinessPartnerTaxNumber", False) if method == "PATCH":
                tax = _find(self.tax_numbers, key, "Tax number")
                return await self._patch_tax_number(request, tax)
            case ("A_BusinessPartnerTaxNumber", False) if reading:
                tax = _find(self.tax_numbers, key, "Tax number")
                return od.read_one(request, base, TAX_NUMBER, tax)
            case ("A_BusinessPartnerAddress" | "A_BusinessPartnerTaxNumber", _):
                raise od.Refused(405, "ZQ2C_SANDBOX/041", f"{method} not allowed")
        return None

    async def _create_address(self, request: web.Request, base: str) -> web.Response:
        address = od.convert(
            await od.body_of(request, ADDRESS), A_BusinessPartnerAddress
        )
        number = self._partner_of(address.BusinessPartner, "A_BusinessPartnerAddress")
        problems = _address_problems(address.Country, "A_BusinessPartnerAddress")
        if problems:
            raise od.invalid(problems)
        record = self._store_address(number, address, self._clock.tick())
        self._counters.partner_addresses_created += 1
        return _created(base, ADDRESS, record)

    async def _patch_address(
        self, request: web.Request, record: od.Record[A_BusinessPartnerAddress]
    ) -> web.Response:
        od.check_if_match(request, record, self._counters)
        wanted = od.changes(await od.body_of(request, ADDRESS), _ADDRESS_UPDATABLE)
        partial = od.convert(wanted, A_BusinessPartnerAddress)
        if "Country" in wanted:
            problems = _address_problems(partial.Country, "A_BusinessPartnerAddress")
            if problems:
                raise od.invalid(problems)
        values = {name: getattr(partial, name) for name in wanted}
        record.entity = _upper(
            msgspec.structs.replace(record.entity, **values), "PostalCode", "Region"
        )
        record.changed_at = self._clock.tick()
        self._counters.partner_addresses_changed += 1
        return web.Response(status=204, headers={"ETag": record.etag})

    async def _create_tax_number(self, request: web.Request, base: str) -> web.Response:
        tax = od.convert(
            await od.body_of(request, TAX_NUMBER), A_BusinessPartnerTaxNumber
        )
        number = self._partner_of(tax.BusinessPartner, "A_BusinessPartnerTaxNumber")
        problems = _tax_problems(tax, "A_BusinessPartnerTaxNumber")
        category = (tax.BPTaxType or "").upper()
        if category in self.tax_numbers.get(number, {}):
            where = "A_BusinessPartnerTaxNumber"
            problems.append(_duplicate(category, f"business partner {number}", where))
        if problems:
            raise od.invalid(problems)
        record = self._store_tax_number(number, tax, self._clock.tick())
        self._counters.tax_numbers_created += 1
        return _created(base, TAX_NUMBER, record)

    async def _patch_tax_number(
        self, request: web.Request, record: od.Record[A_BusinessPartnerTaxNumber]
    ) -> web.Response:
        od.check_if_match(request, record, self._counters)
        wanted = od.changes(await od.body_of(request, TAX_NUMBER), _TAX_UPDATABLE)
        partial = od.convert(wanted, A_BusinessPartnerTaxNumber)
        values = {name: getattr(partial, name) for name in wanted}
        entity = _upper(
            msgspec.structs.replace(record.entity, **values),
            "BPTaxNumber",
            "BPTaxLongNumber",
        )
        if not (entity.BPTaxNumber or entity.BPTaxLongNumber):
            text = "Enter a tax number (BPTaxNumber or BPTaxLongNumber)"
            raise od.invalid([od.detail("012", text, "BPTaxNumber")])
        record.entity = entity
        record.changed_at = self._clock.tick()
        self._counters.tax_numbers_changed += 1
        return web.Response(status=204, headers={"ETag": record.etag})

    # -- storage -----------------------------------------------------------------

    def _partner_of(self, given: str | None, target: str) -> str:
        """The (alpha-converted) partner a create names; 400 when it does not exist."""
        number = od.alpha(given or "")
        if not number or not self._exists(number):
            text = f"Business partner {given or '(none)'} does not exist"
            raise od.invalid([od.detail("028", text, f"{target}/BusinessPartner")])
        return number

    def _store_address(
        self, number: str, address: A_BusinessPartnerAddress, now: datetime
    ) -> od.Record[A_BusinessPartnerAddress]:
        address_id = str(self._next_address)
        self._next_address += 1
        stored = msgspec.structs.replace(
            _upper(address, "PostalCode", "Region"),
            metadata=None,
            BusinessPartner=number,
            AddressID=address_id,
        )
        record = od.Record(entity=stored, changed_at=now)
        self.addresses.setdefault(number, {})[address_id] = record
        return record

    def _store_tax_number(
        self, number: str, tax: A_BusinessPartnerTaxNumber, now: datetime
    ) -> od.Record[A_BusinessPartnerTaxNumber]:
        stored = msgspec.structs.replace(
            _upper(tax, "BPTaxType", "BPTaxNumber", "BPTaxLongNumber"),
            metadata=None,
            BusinessPartner=number,
        )
        record = od.Record(entity=stored, changed_at=now)
        self.tax_numbers.setdefault(number, {})[stored.BPTaxType or ""] = record
        return record


def _created(base: str, spec: od.EntitySpec, record: od.Record[E]) -> web.Response:
    """201 with the created entity, its ETag and its URI."""
    body = od.render(base, spec, record.entity, etag=record.etag)
    uri = od.entity_uri(base, spec, record.entity)
    return od.json_response(
        {"d": body}, status=201, headers={"ETag": record.etag, "Location": uri}
    )


def _stamped(records: Iterable[od.Record[E]]) -> tuple[E, ...]:
    """The entities, each carrying its ETag in ``metadata`` (rendered inline)."""
    return tuple(
        msgspec.structs.replace(r.entity, metadata=Metadata(etag=r.etag))
        for r in records
    )


def _flat(table: dict[str, dict[str, od.Record[E]]]) -> dict[str, od.Record[E]]:
    return {
        f"{partner}/{key}": record
        for partner, records in table.items()
        for key, record in records.items()
    }


def _find(
    table: dict[str, dict[str, od.Record[E]]], key: str | None, what: str
) -> od.Record[E]:
    partner, _, second = (key or "").partition("/")
    found = table.get(od.alpha(partner), {}).get(second.upper())
    if found is None:
        raise od.Refused(404, "ZQ2C_SANDBOX/040", f"{what} {key!r} not found")
    return found


def _upper(entity: E, *names: str) -> E:
    values = {n: v.upper() for n in names if (v := getattr(entity, n))}
    return msgspec.structs.replace(entity, **values) if values else entity


def _address_problems(country: str | None, target: str) -> list[ErrorDetail]:
    if country is not None and _COUNTRY.fullmatch(country):
        return []
    text = f"Country key {country!r} is not valid (2 or 3 upper-case letters)"
    return [od.detail("029", text, f"{target}/Country")]


def _tax_problems(tax: A_BusinessPartnerTaxNumber, target: str) -> list[ErrorDetail]:
    found = []
    if not tax.BPTaxType:
        text = "Enter a tax number category (BPTaxType)"
        found.append(od.detail("012", text, f"{target}/BPTaxType"))
    if not (tax.BPTaxNumber or tax.BPTaxLongNumber):
        text = "Enter a tax number (BPTaxNumber or BPTaxLongNumber)"
        found.append(od.detail("012", text, f"{target}/BPTaxNumber"))
    return found


def _duplicate(category: str, whose: str, target: str) -> ErrorDetail:
    text = f"Tax number category {category.upper()} already exists for {whose}"
    return od.detail("026", text, f"{target}/BPTaxType")
