#!/usr/bin/env python3
"""Minimal Tryton JSON-RPC client (stdlib only) used by smoke.sh and to record README.md.

    rpc.py [--url URL] [--login L --password P] call METHOD 'PARAMS_JSON'
    rpc.py [...] roundtrip     # create+quote+confirm a sale for C10000, exit 0 on success
    rpc.py [...] transcript    # print every documented call with its verbatim request/response

URL defaults to http://$CAUSEWAY_TRYTON_LISTEN/$CAUSEWAY_TRYTON_DB/
(http://127.0.0.1:8000/causeway/). Login defaults to the API user causeway/causeway-api.
"""
import argparse
import base64
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request


def D(s):
    "A Decimal in Tryton's JSON encoding."
    return {'__class__': 'Decimal', 'decimal': str(s)}


class RpcError(Exception):
    def __init__(self, status, body):
        super().__init__(f'{status}: {body}')
        self.status, self.body = status, body


class Client:
    def __init__(self, url, echo=False):
        self.url = url
        self.auth = None
        self.echo = echo
        self.next_id = 0

    def raw(self, method, params, auth=True):
        """POST one call; return (http status, response text). Never raises on HTTP errors."""
        self.next_id += 1
        body = json.dumps({'id': self.next_id, 'method': method, 'params': params},
            ensure_ascii=False)
        headers = {'Content-Type': 'application/json'}
        if auth and self.auth:
            headers['Authorization'] = self.auth
        req = urllib.request.Request(self.url, body.encode(), headers)
        t0 = time.monotonic()
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                status, text = r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            status, text = e.code, e.read().decode()
        ms = (time.monotonic() - t0) * 1000
        if self.echo:
            print('```http')
            print(f'POST {urllib.parse.urlparse(self.url).path} HTTP/1.1')
            print('Content-Type: application/json')
            if 'Authorization' in headers:
                print(f"Authorization: {headers['Authorization']}")
            print()
            print(body)
            print('```')
            print(f'→ HTTP {status} ({ms:.0f} ms)')
            print('```json')
            print(text if len(text) < 4000 else text[:4000] + ' …')
            print('```')
            print()
        return status, text

    def call(self, method, *params):
        status, text = self.raw(method, list(params))
        if status != 200:
            raise RpcError(status, text)
        data = json.loads(text)
        if 'error' in data:
            raise RpcError(status, data['error'])
        return data['result']

    def login(self, login, password):
        uid, session = self.call('common.db.login', login, {'password': password}, 'en')
        token = base64.b64encode(f'{login}:{uid}:{session}'.encode()).decode()
        self.auth = f'Session {token}'
        return uid, session


def section(title):
    print(f'\n#### {title}\n')


def transcript(c, login, password, admin_password):
    ctx = {'company': 1}
    section('server version (no auth, no database needed; used as readiness probe)')
    c.url, url = c.url.rsplit('/', 2)[0] + '/', c.url
    c.raw('common.server.version', [])
    c.url = url

    section('login')
    status, text = c.raw('common.db.login', [login, {'password': password}, 'en'], auth=False)
    uid, session = json.loads(text)['result']
    token = base64.b64encode(f'{login}:{uid}:{session}'.encode()).decode()
    c.auth = f'Session {token}'
    print(f'Authorization header for later calls: `Session base64("{login}:{uid}:{session}")`'
        f' = `{c.auth}`\n')
    section('login with a wrong password')
    c.raw('common.db.login', [login, {'password': 'wrong'}, 'en'], auth=False)
    section('login without password parameter (the client is asked for one)')
    c.raw('common.db.login', [login, {}, 'en'], auth=False)
    section('call with an invalid session')
    saved, c.auth = c.auth, 'Session ' + base64.b64encode(f'{login}:{uid}:nope'.encode()).decode()
    c.raw('model.party.party.search_count', [[], {}])
    c.auth = saved
    section('user preferences (gives the company id for the context)')
    c.raw('model.res.user.get_preferences', [True, {}])

    section('customer by code, with address, identifiers, categories, credit limit, price list')
    fields = ['code', 'name', 'active', 'categories.name',
        'addresses.street', 'addresses.postal_code', 'addresses.city',
        'addresses.country.code', 'addresses.country.organizations.code',
        'identifiers.type', 'identifiers.code',
        'credit_limit_amount', 'credit_amount', 'sale_price_list.name']
    c.raw('model.party.party.search_read',
        [[['code', '=', 'C10000']], 0, None, None, fields, ctx])
    section('same without the company in the context (company-dependent fields are null)')
    c.raw('model.party.party.search_read',
        [[['code', '=', 'C10000']], 0, None, None,
            ['code', 'credit_limit_amount', 'sale_price_list'], {}])
    section('blocked, US and incomplete-address customers')
    c.raw('model.party.party.search_read',
        [[['code', 'in', ['C10050', 'C10060', 'C10100']]], 0, None, [['code', 'ASC']],
            fields, ctx])
    section('unknown customer code (empty list, not an error)')
    c.raw('model.party.party.search_read',
        [[['code', '=', 'C99999']], 0, None, None, ['code'], ctx])

    section('product by code with salable flag, list price, categories, unit and taxes')
    pfields = ['code', 'name', 'active', 'type', 'salable', 'list_price',
        'categories.name', 'sale_uom', 'default_uom.symbol',
        'account_category.customer_taxes_used']
    c.raw('model.product.product.search_read',
        [[['code', 'in', ['1900-S', '2028-S', '2080-W']]], 0, None, [['code', 'ASC']],
            pfields, ctx])

    section('unit of measure PCS (used by all seeded products)')
    status, text = c.raw('model.product.uom.search_read',
        [[['symbol', '=', 'PCS']], 0, None, None, ['name', 'symbol', 'digits', 'rounding'], ctx])
    pcs = json.loads(text)['result'][0]['id']

    section('prices in price list SALES-EU (id 1) for quantity 2')
    c.raw('model.product.product.read',
        [[1, 2, 3, 4], ['code', 'sale_price_uom'], dict(ctx, price_list=1, quantity=2)])
    section('prices in price list SALES-US (id 2) for quantity 2')
    c.raw('model.product.product.read',
        [[1, 2, 3, 4], ['code', 'sale_price_uom'], dict(ctx, price_list=2, quantity=2)])
    section('price lists by name')
    c.raw('model.product.price_list.search_read',
        [[['name', 'in', ['SALES-EU', 'SALES-US']]], 0, None, None,
            ['name', 'lines.category.name', 'lines.formula'], ctx])

    section("let the server fill a sale line like Tryton's client does (optional)")
    c.raw('model.sale.line.on_change', [{
        'type': 'line', 'product': 1, 'quantity': 2, 'unit': None, 'unit_price': None,
        'taxes': [], '_parent_sale.party': 2, '_parent_sale.company': 1,
        '_parent_sale.currency': 1, '_parent_sale.price_list': 1,
        '_parent_sale.sale_date': None}, ['product'], ctx])

    ref = 'OPP-DOC-1'
    section(f'find a sale by reference {ref} (none yet)')
    c.raw('model.sale.sale.search_read',
        [[['reference', '=', ref]], 0, None, None, ['number', 'state', 'reference'], ctx])
    section('create a sale for C10000 (party 2, address 2) with two lines')
    status, text = c.raw('model.sale.sale.create', [[{
        'party': 2, 'invoice_address': 2, 'shipment_address': 2,
        'reference': ref, 'description': 'causeway doc example',
        'lines': [['create', [
            {'type': 'line', 'product': 1, 'quantity': 2, 'unit': pcs,
                'unit_price': D('19.99'), 'taxes': [['add', [1]]]},
            {'type': 'line', 'product': 2, 'quantity': 0.5, 'unit': pcs,
                'unit_price': D('99.18'), 'taxes': [['add', [1]]]},
            ]]],
        }], ctx])
    sale_id = json.loads(text).get('result', [0])[0]
    rfields = ['number', 'reference', 'state', 'party.code', 'currency.code',
        'untaxed_amount', 'tax_amount', 'total_amount',
        'lines.product.code', 'lines.quantity', 'lines.unit_price', 'lines.amount']
    c.raw('model.sale.sale.read', [[sale_id], rfields, ctx])
    section('quote')
    c.raw('model.sale.sale.quote', [[sale_id], ctx])
    c.raw('model.sale.sale.read', [[sale_id], ['number', 'state'], ctx])
    section('confirm')
    c.raw('model.sale.sale.confirm', [[sale_id], ctx])
    c.raw('model.sale.sale.read', [[sale_id], ['number', 'state', 'sale_date',
        'shipment_state', 'invoice_state'], ctx])
    section(f'find the sale by reference {ref}')
    c.raw('model.sale.sale.search_read',
        [[['reference', '=', ref]], 0, None, None, ['number', 'state', 'reference'], ctx])

    section('NOT refused on SQLite: non-existing party id (no foreign keys); fails later')
    status, text = c.raw('model.sale.sale.create', [[{'party': 9999, 'reference': 'ERR-1'}], ctx])
    bad = json.loads(text).get('result')
    if bad:
        c.raw('model.sale.sale.read', [bad, ['party.name'], ctx])
    section('refusal: missing party')
    c.raw('model.sale.sale.create', [[{'reference': 'ERR-1b'}], ctx])
    section('refusal: line with a non-salable product (2080-W, id 4)')
    c.raw('model.sale.sale.create', [[{
        'party': 2, 'invoice_address': 2, 'shipment_address': 2, 'reference': 'ERR-2',
        'lines': [['create', [{'type': 'line', 'product': 4, 'quantity': 1, 'unit': pcs,
            'unit_price': D('583.54')}]]]}], ctx])
    section('refusal: quantity 0.5 in unit "Unit" (id 1, 0 digits) instead of PCS')
    c.raw('model.sale.sale.create', [[{
        'party': 2, 'reference': 'ERR-7',
        'lines': [['create', [{'type': 'line', 'product': 2, 'quantity': 0.5, 'unit': 1,
            'unit_price': D('99.18')}]]]}], ctx])
    section('refusal: line without unit')
    c.raw('model.sale.sale.create', [[{
        'party': 2, 'reference': 'ERR-3',
        'lines': [['create', [{'type': 'line', 'product': 1, 'quantity': 1,
            'unit_price': D('19.99')}]]]}], ctx])
    section('refusal: quote without invoice address')
    status, text = c.raw('model.sale.sale.create', [[{
        'party': 3, 'reference': 'ERR-4', 'lines': [['create', [{'type': 'line',
            'product': 1, 'quantity': 1, 'unit': pcs, 'unit_price': D('19.99')}]]]}], ctx])
    c.raw('model.sale.sale.quote', [json.loads(text)['result'], ctx])
    section('refusal: confirm for the blocked customer C10050 (credit limit 0)')
    status, text = c.raw('model.sale.sale.create', [[{
        'party': 4, 'invoice_address': 4, 'shipment_address': 4, 'reference': 'ERR-5',
        'lines': [['create', [{'type': 'line', 'product': 1, 'quantity': 1, 'unit': pcs,
            'unit_price': D('19.99'), 'taxes': [['add', [1]]]}]]]}], ctx])
    blocked_id = json.loads(text)['result'][0]
    c.raw('model.sale.sale.quote', [[blocked_id], ctx])
    c.raw('model.sale.sale.confirm', [[blocked_id], ctx])
    c.raw('model.sale.sale.read', [[blocked_id], ['number', 'state'], ctx])
    section('same confirm as admin (member of group "Credit Limit"): a UserWarning instead')
    admin = Client(c.url, echo=True)
    admin.next_id = c.next_id
    admin.login('admin', admin_password)
    admin.raw('model.sale.sale.confirm', [[blocked_id], ctx])
    c.next_id = admin.next_id
    section('refusal: unknown field / method (server exception, not a UserError)')
    c.raw('model.product.product.read', [[1], ['no_such_field'], ctx])
    c.raw('model.sale.sale.no_such_method', [[1], ctx])
    section('not a refusal: US-ONLY product 2028-S sold to EU customer C10000 is accepted')
    c.raw('model.sale.sale.create', [[{
        'party': 2, 'invoice_address': 2, 'shipment_address': 2, 'reference': 'ERR-6',
        'lines': [['create', [{'type': 'line', 'product': 3, 'quantity': 1, 'unit': pcs,
            'unit_price': D('1054.07')}]]]}], ctx])
    section('logout')
    c.raw('common.db.logout', [])


def roundtrip(c, login, password, reference):
    ctx = {'company': 1}
    t0 = time.monotonic()
    c.login(login, password)
    party, = c.call('model.party.party.search_read',
        [['code', '=', 'C10000']], 0, None, None, ['addresses'], ctx)
    product, = c.call('model.product.product.search_read',
        [['code', '=', '1900-S']], 0, None, None,
        ['salable', 'sale_uom', 'account_category.customer_taxes_used'], ctx)
    assert product['salable'], product
    addr = party['addresses'][0]
    sale_id, = c.call('model.sale.sale.create', [{
        'party': party['id'], 'invoice_address': addr, 'shipment_address': addr,
        'reference': reference,
        'lines': [['create', [{'type': 'line', 'product': product['id'], 'quantity': 2,
            'unit': product['sale_uom'], 'unit_price': D('19.99'),
            'taxes': [['add', product['account_category.']['customer_taxes_used']]]}]]],
        }], ctx)
    c.call('model.sale.sale.quote', [sale_id], ctx)
    c.call('model.sale.sale.confirm', [sale_id], ctx)
    sale, = c.call('model.sale.sale.search_read', [['reference', '=', reference]],
        0, None, None, ['number', 'state', 'total_amount'], ctx)
    assert sale['id'] == sale_id and sale['number'] and sale['state'] in (
        'confirmed', 'processing'), sale
    assert sale['total_amount'] == D('47.58'), sale
    print(f"roundtrip ok: sale id={sale_id} number={sale['number']} state={sale['state']}"
        f" total={sale['total_amount']['decimal']} in {time.monotonic() - t0:.2f}s")


def main():
    listen = os.environ.get('CAUSEWAY_TRYTON_LISTEN', '127.0.0.1:8000')
    db = os.environ.get('CAUSEWAY_TRYTON_DB', 'causeway')
    ap = argparse.ArgumentParser()
    ap.add_argument('--url', default=f'http://{listen}/{db}/')
    ap.add_argument('--login', default='causeway')
    ap.add_argument('--password', default='causeway-api')
    ap.add_argument('--admin-password', default='causeway-admin')
    sub = ap.add_subparsers(dest='cmd', required=True)
    p = sub.add_parser('call')
    p.add_argument('method')
    p.add_argument('params', nargs='?', default='[]')
    p = sub.add_parser('roundtrip')
    p.add_argument('--reference', default=f'SMOKE-{int(time.time())}')
    sub.add_parser('transcript')
    args = ap.parse_args()
    if args.cmd == 'call':
        c = Client(args.url)
        if not args.method.startswith('common.'):
            c.login(args.login, args.password)
        c.echo = True
        c.raw(args.method, json.loads(args.params))
    elif args.cmd == 'roundtrip':
        try:
            roundtrip(Client(args.url), args.login, args.password, args.reference)
        except (RpcError, AssertionError, OSError) as e:
            print(f'roundtrip FAILED: {e!r}', file=sys.stderr)
            sys.exit(1)
    else:
        transcript(Client(args.url, echo=True), args.login, args.password,
            args.admin_password)


if __name__ == '__main__':
    main()
