#!/usr/bin/env python3
"""Play the warehouse and finance in the Tryton test database: what happens to a sale after the
gateway confirmed it, so change detection has something to find.

    lifecycle.py DATA_DIR REFERENCE ship|invoice|pay|cancel

REFERENCE is the sale's `reference` (the opportunity id). ship: the customer shipment is
assigned, picked, packed and done. invoice: the sale's draft invoice is validated and posted.
pay: the posted invoice is paid in full in cash (a cash payment method is made on first use).
cancel: a sale not shipped yet is cancelled (its draft invoice and waiting shipment with it).
Runs trytond in-process (proteus) on DATA_DIR/trytond.conf, beside a running server.
"""
import sys
from decimal import Decimal
from pathlib import Path


def main():
    data_dir, reference, step = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    from proteus import Model, Wizard, config
    config.set_trytond(database='causeway', user='admin', config_file=str(data_dir / 'trytond.conf'))
    Sale = Model.get('sale.sale')
    sales = Sale.find([('reference', '=', reference)])
    if len(sales) != 1:
        sys.exit(f'{len(sales)} sales with reference {reference!r}')
    sale, = sales
    if step == 'ship':
        for shipment in sale.shipments:
            if shipment.state == 'waiting':
                shipment.click('assign_force')
            if shipment.state == 'assigned':
                shipment.click('pick')
            if shipment.state == 'picked':
                shipment.click('pack')
            if shipment.state == 'packed':
                shipment.click('done')
    elif step == 'invoice':
        for invoice in sale.invoices:
            if invoice.state == 'draft':
                invoice.click('validate_invoice')
            if invoice.state == 'validated':
                invoice.click('post')
    elif step == 'pay':
        method = cash_method()
        for invoice in sale.invoices:
            if invoice.state != 'posted':
                continue
            pay = Wizard('account.invoice.pay', [invoice])
            pay.form.payment_method = method
            pay.form.amount = invoice.amount_to_pay
            pay.execute('choice')
    elif step == 'cancel':
        sale.click('cancel')
    else:
        sys.exit(f'unknown step {step!r}: ship, invoice, pay or cancel')
    sale.reload()
    print(f'{reference}: {sale.state} shipment {sale.shipment_state} invoice {sale.invoice_state}')


def cash_method():
    from proteus import Model
    Method = Model.get('account.invoice.payment.method')
    found = Method.find([('name', '=', 'Cash')])
    if found:
        return found[0]
    Journal = Model.get('account.journal')
    Account = Model.get('account.account')
    journal, = Journal.find([('type', '=', 'cash')])
    cash = Account.find([('type.statement', '=', 'balance'), ('name', 'ilike', '%cash%')])
    if not cash:
        sys.exit('no cash account in the chart')
    method = Method(name='Cash', journal=journal, credit_account=cash[0], debit_account=cash[0])
    method.save()
    return method


if __name__ == '__main__':
    main()
