#!/usr/bin/env python3
"""Create a fresh, seeded Tryton 7.0 SQLite database for causeway's integration tests.

Run with the venv's python:

    .venv-tryton/bin/python scripts/tryton/setup.py [--data-dir DIR] [--db NAME] [--listen HOST:PORT]

DIR defaults to $CAUSEWAY_TRYTON_DIR or /tmp/causeway-tryton. The script
  1. writes DIR/trytond.conf (SQLite in DIR, [web] listen = HOST:PORT),
  2. deletes DIR/NAME.sqlite and creates it again with `trytond-admin`
     (admin password from a TRYTONPASSFILE written to DIR/.adminpass),
  3. seeds deterministic master data with proteus (in-process, no server needed).

Everything it creates is listed in README.md. Re-running it gives the same data
(same ids, same codes); only dates derived from "today" (fiscal years) move.
"""
import argparse
import hashlib
import datetime as dt
import os
import shutil
import subprocess
import sys
import time
import warnings
from decimal import Decimal
from pathlib import Path

warnings.filterwarnings('ignore', category=DeprecationWarning)  # passlib: 'crypt'
os.environ.setdefault('PYTHONWARNINGS', 'ignore::DeprecationWarning')

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent

ADMIN_LOGIN = 'admin'
# Tryton refuses a password equal to the login, so admin/admin is impossible.
ADMIN_PASSWORD = 'causeway-admin'
API_LOGIN = 'causeway'
API_PASSWORD = 'causeway-api'

MODULES = [
    'country', 'currency', 'party', 'company', 'product',
    'account', 'account_product', 'account_invoice', 'stock', 'sale',
    'product_price_list', 'sale_price_list',
    'account_credit_limit', 'sale_credit_limit',
]

COMPANY_NAME = 'CRONUS Causeway Sandbox'

# Mirrors src/erp/sandbox/data.rs where the brief allows (names, cities, tax ids, codes).
# region is not stored: it follows from the address country (see README).
CUSTOMERS = [
    # code, name, country, city, street, postal_code, tax id (type, value), credit limit, blocked
    dict(code='C10000', name='Adatum Handels GmbH', country='DE', city='Berlin',
        street='Unter den Linden 12', postal_code='10117',
        tax=('eu_vat', 'DE811907980'), credit_limit=Decimal('500000'), blocked=False),
    dict(code='C10001', name='Bordeaux Fournitures SARL', country='FR', city='Bordeaux',
        street='12 Quai des Chartrons', postal_code='33000',
        tax=('eu_vat', 'FR40303265045'), credit_limit=Decimal('80000'), blocked=False),
    dict(code='C10050', name='Lyon Textiles SA', country='FR', city='Lyon',
        street='3 Rue de la République', postal_code='69002',
        tax=('eu_vat', 'FR83404833048'), credit_limit=Decimal('0'), blocked=True),
    dict(code='C10060', name='Contoso Retail Inc.', country='US', city='Seattle',
        street='400 Pine Street', postal_code='98101',
        tax=('us_ein', '911144442'), credit_limit=Decimal('500000'), blocked=False),
    dict(code='C10100', name='Wide World Importers', country='US', city='San Francisco',
        street='', postal_code=None,
        tax=('us_ein', '945556667'), credit_limit=Decimal('75000'), blocked=False),
]

PRODUCTS = [
    # code, name, list price, category, salable, type
    dict(code='1900-S', name='ATHENS Desk', price=Decimal('19.99'),
        category='FURNITURE', salable=True),
    dict(code='1904-W', name='PARIS Guest Chair', price=Decimal('99.18'),
        category='FURNITURE', salable=True),
    dict(code='2028-S', name='Coat Stand', price=Decimal('1054.07'),
        category='US-ONLY', salable=True),
    dict(code='2080-W', name='Legacy Chair (discontinued)', price=Decimal('583.54'),
        category='FURNITURE', salable=False),
]

# Region price lists: category -> formula. A category without a line gets no price
# (compute returns None), which is how "restricted items have no line" is mirrored.
PRICE_LISTS = {
    'SALES-EU': {
        'FURNITURE': "(unit_price * 0.92).quantize(Decimal('0.01'))",
    },
    'SALES-US': {
        'FURNITURE': 'unit_price * 1',
        'US-ONLY': 'unit_price * 1',
    },
}

COUNTRIES = [
    # code, code3, numeric, name, organisation code
    ('DE', 'DEU', '276', 'Germany', 'EU'),
    ('FR', 'FRA', '250', 'France', 'EU'),
    ('US', 'USA', '840', 'United States', None),
]


def log(msg, t0=[time.monotonic()]):
    print(f'[setup {time.monotonic() - t0[0]:6.2f}s] {msg}', flush=True)


def write_config(data_dir: Path, listen: str) -> Path:
    conf = data_dir / 'trytond.conf'
    conf.write_text(f"""[database]
uri = sqlite://
path = {data_dir}
language = en

[web]
listen = {listen}

[session]
# default is 300 s of inactivity; tests may keep one session for longer
timeout = 3600

[password]
length = 0
""")
    return conf


def create_database(conf: Path, data_dir: Path, db: str):
    db_file = data_dir / f'{db}.sqlite'
    for suffix in ('', '-journal', '-wal', '-shm'):
        p = Path(str(db_file) + suffix)
        if p.exists():
            p.unlink()
    # The SQLite backend only opens existing files: create an empty one first.
    db_file.touch()
    passfile = data_dir / '.adminpass'
    passfile.write_text(ADMIN_PASSWORD + '\n')
    env = dict(os.environ, TRYTONPASSFILE=str(passfile))
    cmd = [str(BIN / 'trytond-admin'), '-c', str(conf), '-d', db,
        '--email', 'admin@causeway.test',
        '-u', *MODULES, '--activate-dependencies']
    log('trytond-admin ' + ' '.join(cmd[1:]))
    subprocess.run(cmd, env=env, check=True)


def seed(conf: Path, db: str):
    from proteus import Model, Wizard, config as pconfig
    from trytond.modules.account.tests.tools import (
        create_chart, get_accounts)
    from trytond.modules.account_invoice.tests.tools import (
        set_fiscalyear_invoice_sequences, create_payment_term)
    from trytond.modules.company.tests.tools import create_company, get_company

    cfg = pconfig.set_trytond(database=db, user=ADMIN_LOGIN, config_file=str(conf))

    # --- currencies -------------------------------------------------------
    Currency = Model.get('currency.currency')
    eur = Currency(name='Euro', code='EUR', symbol='€', rounding=Decimal('0.01'), digits=2)
    # Conversions need a rate on both currencies (Tryton rates are relative).
    eur.rates.new(date=dt.date(2020, 1, 1), rate=Decimal('1.0'))
    eur.save()
    usd = Currency(name='US Dollar', code='USD', symbol='$', rounding=Decimal('0.01'), digits=2)
    # Rate 1.0 on purpose: SALES-US is "1.0 x list price" in USD in the sandbox, so
    # prices converted from the EUR company currency stay numerically equal.
    usd.rates.new(date=dt.date(2020, 1, 1), rate=Decimal('1.0'))
    usd.save()

    # --- countries and the EU organisation (shipped by the country module) ---
    Country = Model.get('country.country')
    Organization = Model.get('country.organization')
    eu, = Organization.find([('code', '=', 'EU')])
    countries = {}
    for code, code3, num, name, org in COUNTRIES:
        c = Country(code=code, code3=code3, code_numeric=num, name=name)
        c.save()
        countries[code] = c
        if org == 'EU':
            eu.members.new(country=c)
    eu.save()

    # --- company --------------------------------------------------------------
    Party = Model.get('party.party')
    company_party = Party(name=COMPANY_NAME, code='COMPANY')
    addr = company_party.addresses[0]
    addr.street = 'Friedrichstraße 1'
    addr.postal_code = '10117'
    addr.city = 'Berlin'
    addr.country = countries['DE']
    company_party.save()
    create_company(party=company_party, currency=eur)
    company = get_company()
    log(f'company id={company.id}')

    # --- fiscal years (current and next calendar year) with monthly periods ---
    FiscalYear = Model.get('account.fiscalyear')
    Sequence = Model.get('ir.sequence')
    SequenceType = Model.get('ir.sequence.type')
    move_seq_type, = SequenceType.find([('name', '=', 'Account Move')], limit=1)
    year = dt.date.today().year
    for y in (year, year + 1):
        fy = FiscalYear(name=str(y), start_date=dt.date(y, 1, 1),
            end_date=dt.date(y, 12, 31), company=company)
        seq = Sequence(name=f'Account Move {y}', sequence_type=move_seq_type, company=company)
        seq.save()
        fy.post_move_sequence = seq
        set_fiscalyear_invoice_sequences(fy)
        fy.save()
        fy.click('create_period')
    log('fiscal years created')

    # --- chart of accounts (the account module's minimal English template) ---
    create_chart(company)
    accounts = get_accounts(company)

    # --- tax ------------------------------------------------------------------
    Tax = Model.get('account.tax')
    vat = Tax(name='VAT 19%', description='VAT 19%', type='percentage',
        rate=Decimal('0.19'), invoice_account=accounts['tax'],
        credit_note_account=accounts['tax'])
    vat.save()

    # Sale numbers SO-00001, SO-00002, ... (default sequence has no prefix: "1", "2", ...)
    SaleConfig = Model.get('sale.configuration')
    sale_seq = SaleConfig(1).sale_sequence
    sale_seq.prefix = 'SO-'
    sale_seq.padding = 5
    sale_seq.save()

    payment_term = create_payment_term()
    payment_term.save()

    # --- product categories ---------------------------------------------------
    ProductCategory = Model.get('product.category')
    account_category = ProductCategory(name='Goods 19% VAT', accounting=True,
        account_revenue=accounts['revenue'], account_expense=accounts['expense'])
    account_category.customer_taxes.append(Tax(vat.id))
    account_category.save()
    categories = {}
    for name in ('FURNITURE', 'US-ONLY'):
        c = ProductCategory(name=name)
        c.save()
        categories[name] = c

    # --- products -------------------------------------------------------------
    Uom = Model.get('product.uom')
    unit, = Uom.find([('name', '=', 'Unit')])
    # Tryton's "Unit" has 0 digits and refuses quantity 0.5; the sandbox sells 0.5 PCS
    # of 1904-W, so products use a "Piece" unit (symbol PCS) with 2 digits.
    pcs = Uom(name='Piece', symbol='PCS', category=unit.category, factor=1,
        rate=1, rounding=0.01, digits=2)
    pcs.save()
    log(f'uom PCS id={pcs.id} (Unit id={unit.id})')
    Template = Model.get('product.template')
    for p in PRODUCTS:
        t = Template(name=p['name'], code=p['code'], type='goods',
            default_uom=pcs, list_price=p['price'], salable=p['salable'],
            account_category=account_category)
        t.categories.append(ProductCategory(categories[p['category']].id))
        t.save()
        product, = t.products
        log(f'product {product.code} id={product.id} template={t.id}')

    # --- price lists ------------------------------------------------------------
    PriceList = Model.get('product.price_list')
    price_lists = {}
    for name, lines in PRICE_LISTS.items():
        pl = PriceList(name=name, price='list_price', company=company)
        for cat, formula in lines.items():
            pl.lines.new(category=ProductCategory(categories[cat].id), formula=formula)
        pl.save()
        price_lists[name] = pl
        log(f'price list {name} id={pl.id}')

    # --- customers ----------------------------------------------------------------
    PartyCategory = Model.get('party.category')
    blocked_cat = PartyCategory(name='blocked')
    blocked_cat.save()
    for c in CUSTOMERS:
        party = Party(name=c['name'], code=c['code'])
        a = party.addresses[0]
        a.street = c['street'] or None
        a.postal_code = c['postal_code']
        a.city = c['city']
        a.country = countries[c['country']]
        party.contact_mechanisms.new(type='email',
            value=f"ap@{c['code'].lower()}.causeway.test")
        kind, value = c['tax']
        party.identifiers.new(type=kind, code=value)
        if c['blocked']:
            party.categories.append(PartyCategory(blocked_cat.id))
        region = 'US' if c['country'] == 'US' else 'EU'
        party.sale_price_list = price_lists[f'SALES-{region}']
        party.credit_limit_amount = c['credit_limit']
        party.save()
        log(f"customer {party.code} id={party.id}")

    # --- API user (not in the credit-limit group: over-limit is an error, not a warning) ---
    User = Model.get('res.user')
    Group = Model.get('res.group')
    api = User(name='Causeway API', login=API_LOGIN, password=API_PASSWORD)
    for gname in ('Sales', 'Product Administration'):
        g, = Group.find([('name', '=', gname)])
        api.groups.append(g)
    api.companies.append(company)
    api.company = company
    api.save()
    log(f'user {API_LOGIN} id={api.id}')


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--data-dir', default=os.environ.get(
        'CAUSEWAY_TRYTON_DIR', '/tmp/causeway-tryton'))
    ap.add_argument('--db', default=os.environ.get('CAUSEWAY_TRYTON_DB', 'causeway'))
    ap.add_argument('--listen', default=os.environ.get(
        'CAUSEWAY_TRYTON_LISTEN', '127.0.0.1:8000'))
    ap.add_argument('--reuse', action='store_true', help=(
        'copy DIR/NAME.sqlite.seed (kept by an earlier run of the same setup.py, '
        'requirements and year) over DIR/NAME.sqlite instead of rebuilding (~0.1 s)'))
    args = ap.parse_args()
    data_dir = Path(args.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    conf = write_config(data_dir, args.listen)
    db_file = data_dir / f'{args.db}.sqlite'
    # Not *.sqlite, so trytond does not list the snapshot as a database.
    snapshot = data_dir / f'{args.db}.sqlite.seed'
    stamp = data_dir / f'{args.db}.sqlite.seed.key'
    key = hashlib.sha256(b''.join([
        Path(__file__).read_bytes(), (HERE / 'requirements.txt').read_bytes(),
        str(dt.date.today().year).encode()])).hexdigest()
    if args.reuse and snapshot.exists() and stamp.exists() and stamp.read_text() == key:
        shutil.copyfile(snapshot, db_file)
        log(f'restored {db_file} from {snapshot.name}')
        return
    create_database(conf, data_dir, args.db)
    log('database created, seeding')
    seed(conf, args.db)
    shutil.copyfile(db_file, snapshot)
    stamp.write_text(key)
    log(f'done: {db_file} (snapshot {snapshot.name})')


if __name__ == '__main__':
    main()
